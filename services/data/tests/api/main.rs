//! Integration tests of the data service against the real PostgreSQL primary and replica.

mod helpers;
mod lifecycle;
