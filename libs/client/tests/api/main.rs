//! Integration tests of the client stack against real servers on loopback:
//! `echo_relay` processes (the crate's example) that are SIGKILLed and
//! restarted, the real rate-limit and audit services, the OTLP receiver.

mod balance;
mod breaker;
mod deadline;
mod helpers;
mod trace;
mod typed;
