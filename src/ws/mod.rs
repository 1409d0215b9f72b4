//! RFC 6455 framing, sans-IO: the reactor hands this module bytes and gets
//! whole messages back; nothing here touches a socket.
//!
//! * [`frame`]: header parsing (tungstenite's `FrameHeader`), masking, and the
//!   encoders for server frames (unmasked, so one encoding can be shared by
//!   every recipient of a fan-out).
//! * [`inbound`]: the per-connection reassembly state (a partial frame and a
//!   fragmented message), kept empty while a connection is idle.

pub mod frame;
pub mod inbound;

pub use frame::{CloseCode, OpCode};
pub use inbound::{BufPool, Flow, Inbound, Limits, Message, WsError};
