//! netio: placeholder, being written.
