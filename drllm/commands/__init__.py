"""One module per ``drllm`` subcommand, each with ``add_parser(subparsers)`` and ``run(args)``."""
