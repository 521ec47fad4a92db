"""Streaming generation for ``drllm generate``: the routed path first, then the text as it is generated."""

from __future__ import annotations

import sys

from transformers import TextStreamer

from .paths import path_to_str
from .runtime.control import last_paths


class PathStreamer(TextStreamer):
    """transformers' ``TextStreamer`` that prints the prompt's path before the first generated token.

    Routing happens once, on the prompt, so the path is known as soon as the
    prefill has run: ``generate`` then hands the streamer its first new token.
    """

    def __init__(self, model, tokenizer, file=None, **decode_kwargs):
        super().__init__(tokenizer, skip_prompt=True, **decode_kwargs)
        self.model = model
        self.file = file
        self.path = None

    def put(self, value):
        if self.path is None and not self.next_tokens_are_prompt:
            self.path = last_paths(self.model)[0]
            self._write(f"path: {path_to_str(self.path)} ({int(self.path.sum())}/{self.path.numel()} block "
                        "applications per pass)\n")
        super().put(value)

    def on_finalized_text(self, text: str, stream_end: bool = False):
        self._write(text + ("\n" if stream_end else ""))

    def _write(self, text: str) -> None:
        if text:
            file = self.file or sys.stdout  # looked up per write: pytest swaps sys.stdout
            file.write(text)
            file.flush()
