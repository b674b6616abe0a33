//! spindrift client: not yet implemented (see the issue tracker).
