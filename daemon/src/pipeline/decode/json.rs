//! JSON frames: the tensor's numbers stream from the parser straight into the sink (no
//! intermediate `serde_json::Value` tree), checked against the input's shape as they come.

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, SeqAccess, Visitor};

use super::sink::{Num, Sink};
use crate::reject::{Reject, RejectReason};

/// One JSON value at nesting `depth` (0 = the input's top-level value).
pub(super) struct Node<'a, 's> {
    pub(super) sink: &'a mut Sink<'s>,
    pub(super) depth: usize,
}

impl<'de> DeserializeSeed<'de> for Node<'_, '_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Node<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a number or an array of numbers")
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        self.sink.leaf(self.depth, Num::U(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.sink.leaf(self.depth, Num::I(v))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        self.sink.leaf(self.depth, Num::F(v))
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        self.sink.leaf(self.depth, Num::B(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        let what = format!(
            "input `{}` contains the string {v:?} where a number belongs",
            self.sink.spec.name
        );
        Err(self.sink.fail(Reject::new(RejectReason::WrongDtype, what)))
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        let what = format!("input `{}` contains null where a number belongs", self.sink.spec.name);
        Err(self.sink.fail(Reject::new(RejectReason::WrongDtype, what)))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let rank = self.sink.spec.shape.len();
        if self.depth >= rank.max(1) {
            let r = self.sink.shape_error(format!("is nested deeper than its rank {rank}"));
            return Err(self.sink.fail(r));
        }
        let mut n = 0usize;
        while seq
            .next_element_seed(Node { sink: &mut *self.sink, depth: self.depth + 1 })?
            .is_some()
        {
            n += 1;
        }
        let flat = self.sink.leaf_depth == Some(1) && rank != 1;
        let expected = if flat { self.sink.total } else { self.sink.spec.shape[self.depth] };
        if n != expected {
            let r = if flat {
                self.sink.shape_error(format!("has {n} elements"))
            } else {
                self.sink.shape_error(format!(
                    "has {n} entries on axis {} (expected {expected})",
                    self.depth
                ))
            };
            return Err(self.sink.fail(r));
        }
        Ok(())
    }

    fn visit_map<A: de::MapAccess<'de>>(self, _map: A) -> Result<(), A::Error> {
        let what = format!(
            "input `{}` contains an object where a number or array belongs",
            self.sink.spec.name
        );
        Err(self.sink.fail(Reject::new(RejectReason::WrongShape, what)))
    }
}
