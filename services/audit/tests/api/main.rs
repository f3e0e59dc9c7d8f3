//! Integration tests of the audit service against the real PostgreSQL primary and replica.

mod helpers;
mod lifecycle;
