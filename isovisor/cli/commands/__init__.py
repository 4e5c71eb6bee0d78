"""One module per `isovisor` subcommand, each exposing `register(subparsers)`."""
