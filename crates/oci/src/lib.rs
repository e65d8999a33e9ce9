//! bakedb-oci: a daemonless, rootless, reproducible OCI image writer and reader.
//!
//! This crate knows OCI image layouts, archives and blobs; it knows nothing about databases.
//! Every blob is streamed through a hasher into a temporary file that is fsynced and renamed
//! into place, and `index.json` is replaced last, so a reader never sees a half-written image.

pub mod archive;
pub mod blob;
pub mod compress;
pub mod digest;
pub mod error;
mod fsutil;
pub mod garbage;
pub mod image;
pub mod index;
pub mod layer;
pub mod layout;
pub mod output;
pub mod reference;
pub mod registry;
pub mod source;
pub mod tarball;
pub mod time;
pub mod verify;

pub use digest::Digest;
pub use error::{Error, RegistryFailure, Result};
pub use oci_spec;
