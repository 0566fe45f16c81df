"""One module per `dstk` subcommand: each has register(subparsers) and run(args) -> int."""
