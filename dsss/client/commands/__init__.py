"""The CLI's commands, one module per group; each module's `register(sub)` adds its subparsers."""
