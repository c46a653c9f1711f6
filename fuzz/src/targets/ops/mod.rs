//! `ops`: operation sequences on a valid image, checked step by step against a plain model.

use super::*;

mod input;
mod model;
mod run;

pub use input::*;
use model::*;
pub use run::*;
