//! The `luna` command line as a library.
