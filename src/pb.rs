//! Generated code for our ext_authz proto subset (see `proto/README.md`).
#![allow(clippy::all, missing_docs)]

include!(concat!(env!("OUT_DIR"), "/pb.rs"));
