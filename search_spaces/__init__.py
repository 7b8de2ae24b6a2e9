"""Built-in search spaces (one file per space). See mura_tune.search.spaces."""
