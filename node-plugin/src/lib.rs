//! The node plugin's library side: what its binary and its root tests share.

pub mod fixup;
