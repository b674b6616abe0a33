//! spindrift server: not yet implemented (see the issue tracker).
