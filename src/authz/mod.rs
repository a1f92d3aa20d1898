//! Authentication and authorization: who is calling ([`token`], [`principal`], [`dev`]), what
//! their SMART scopes allow ([`scopes`]), what the Casbin policy allows ([`policy`]), and the one
//! decision point that combines them and hands out the capability to touch storage
//! ([`decision`]).

pub mod decision;
pub mod dev;
pub mod policy;
pub mod principal;
pub mod scopes;
pub mod token;
