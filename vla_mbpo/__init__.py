"""vla-mbpo: the command line that ties the packages together (see `vla-mbpo --help`)."""
