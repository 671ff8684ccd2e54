"""The ``aligndistil`` console command: a thin dispatcher over the three packages' subcommands."""
