//! The injector's JSON Patch: `add` and `replace` operations, the only ones
//! it writes. Values built for each pod are JSON values; the sidecar and its
//! volume are [`Prebuilt`] once per config, with their JSON text, so a
//! review shares them instead of copying, and serde_json writes their text
//! as is.

use std::sync::Arc;

use json_patch::{AddOperation, PatchOperation, ReplaceOperation, jsonptr::PointerBuf};
use serde::{Deserialize, Serialize, Serializer, ser::SerializeStruct};
use serde_json::{Value, value::RawValue};

use super::view::{ContainerView, VolumeView};

/// A JSON Patch (RFC 6902) of `add` and `replace` operations.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PodPatch(pub Vec<Operation>);

#[derive(Debug, Clone, PartialEq)]
pub struct Operation {
    pub op: Op,
    pub path: PointerBuf,
    pub value: PatchValue,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Add,
    Replace,
}

#[derive(Debug, Clone)]
pub enum PatchValue {
    Json(Value),
    Prebuilt(Arc<Prebuilt>),
}

/// Values are equal when their JSON is, prebuilt or not.
impl PartialEq for PatchValue {
    fn eq(&self, other: &Self) -> bool {
        self.value() == other.value()
    }
}

/// A value built once per config, with its JSON text and, for the sidecar
/// and its volume, the view the patch check reads of it.
#[derive(Debug)]
pub struct Prebuilt {
    value: Value,
    text: Box<RawValue>,
    view: Option<PrebuiltView>,
}

/// The view of a prebuilt container or volume, read from its JSON once: the
/// value is that item alone, or a list of just that item.
#[derive(Debug)]
pub struct PrebuiltView {
    pub item: ItemView,
    pub in_list: bool,
}

#[derive(Debug)]
pub enum ItemView {
    Container(ContainerView<'static>),
    Volume(VolumeView<'static>),
}

impl ItemView {
    /// The view of a container's JSON; `None` if it does not read as one.
    pub fn container(value: &Value) -> Option<Self> {
        ContainerView::deserialize(value.clone())
            .ok()
            .map(Self::Container)
    }

    /// The view of a volume's JSON; `None` if it does not read as one.
    pub fn volume(value: &Value) -> Option<Self> {
        VolumeView::deserialize(value.clone())
            .ok()
            .map(Self::Volume)
    }
}

impl Prebuilt {
    pub fn new(value: Value) -> Arc<Self> {
        Self::with_view(value, None)
    }

    pub fn with_view(value: Value, view: Option<PrebuiltView>) -> Arc<Self> {
        let text = serde_json::value::to_raw_value(&value).expect("a JSON value serializes");
        Arc::new(Self { value, text, view })
    }

    /// The JSON text, as written into patches.
    pub fn text(&self) -> &str {
        self.text.get()
    }

    pub fn view(&self) -> Option<&PrebuiltView> {
        self.view.as_ref()
    }
}

impl PatchValue {
    pub fn value(&self) -> &Value {
        match self {
            Self::Json(value) => value,
            Self::Prebuilt(prebuilt) => &prebuilt.value,
        }
    }
}

impl Operation {
    pub fn add(path: PointerBuf, value: impl Into<PatchValue>) -> Self {
        Self {
            op: Op::Add,
            path,
            value: value.into(),
        }
    }

    pub fn replace(path: PointerBuf, value: impl Into<PatchValue>) -> Self {
        Self {
            op: Op::Replace,
            path,
            value: value.into(),
        }
    }
}

impl From<Value> for PatchValue {
    fn from(value: Value) -> Self {
        Self::Json(value)
    }
}

impl From<Arc<Prebuilt>> for PatchValue {
    fn from(prebuilt: Arc<Prebuilt>) -> Self {
        Self::Prebuilt(prebuilt)
    }
}

impl PodPatch {
    /// The same patch as `json_patch`'s type, to apply it to a JSON document.
    pub fn to_json_patch(&self) -> json_patch::Patch {
        json_patch::Patch(
            self.0
                .iter()
                .map(|operation| {
                    let path = operation.path.clone();
                    let value = operation.value.value().clone();
                    match operation.op {
                        Op::Add => PatchOperation::Add(AddOperation { path, value }),
                        Op::Replace => PatchOperation::Replace(ReplaceOperation { path, value }),
                    }
                })
                .collect(),
        )
    }
}

/// A `json_patch` operation the injector never writes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("operation {index} is {op:?}; the injector writes only add and replace")]
pub struct UnsupportedOperation {
    pub index: usize,
    pub op: &'static str,
}

impl UnsupportedOperation {
    fn at(index: usize, op: &'static str) -> Self {
        Self { index, op }
    }
}

impl TryFrom<&json_patch::Patch> for PodPatch {
    type Error = UnsupportedOperation;

    fn try_from(patch: &json_patch::Patch) -> Result<Self, Self::Error> {
        patch
            .0
            .iter()
            .enumerate()
            .map(|(index, operation)| match operation {
                PatchOperation::Add(add) => Ok(Operation::add(add.path.clone(), add.value.clone())),
                PatchOperation::Replace(replace) => Ok(Operation::replace(
                    replace.path.clone(),
                    replace.value.clone(),
                )),
                PatchOperation::Remove(_) => Err(UnsupportedOperation::at(index, "remove")),
                PatchOperation::Move(_) => Err(UnsupportedOperation::at(index, "move")),
                PatchOperation::Copy(_) => Err(UnsupportedOperation::at(index, "copy")),
                PatchOperation::Test(_) => Err(UnsupportedOperation::at(index, "test")),
            })
            .collect::<Result<_, _>>()
            .map(PodPatch)
    }
}

impl Serialize for PodPatch {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(&self.0)
    }
}

impl Serialize for Operation {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut operation = serializer.serialize_struct("Operation", 3)?;
        let op = match self.op {
            Op::Add => "add",
            Op::Replace => "replace",
        };
        operation.serialize_field("op", op)?;
        operation.serialize_field("path", &self.path)?;
        operation.serialize_field("value", &self.value)?;
        operation.end()
    }
}

impl Serialize for PatchValue {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Json(value) => value.serialize(serializer),
            // Written as is by serde_json; other serializers parse the text.
            Self::Prebuilt(prebuilt) => prebuilt.text.serialize(serializer),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pointer(path: &str) -> PointerBuf {
        PointerBuf::parse(path).unwrap()
    }

    /// Our patch writes what `json_patch` writes for the same operations,
    /// prebuilt values included.
    #[test]
    fn serializes_as_json_patch_does() {
        let sidecar = json!({"name": "exporter", "args": ["--a=\"b\"", "é"]});
        let patch = PodPatch(vec![
            Operation::add(pointer("/spec/initContainers"), Prebuilt::new(sidecar)),
            Operation::replace(pointer("/spec/containers/0/env/1/value"), json!("x y")),
            Operation::add(pointer("/metadata/labels/a~1b"), json!("v")),
        ]);
        let ours: Value = serde_json::from_slice(&serde_json::to_vec(&patch).unwrap()).unwrap();
        let theirs = serde_json::to_value(patch.to_json_patch()).unwrap();
        assert_eq!(ours, theirs);
        assert_eq!(serde_json::to_value(&patch).unwrap(), theirs);
        assert_eq!(PodPatch::try_from(&patch.to_json_patch()).unwrap(), patch);
    }

    #[test]
    fn other_operations_are_refused() {
        let patch: json_patch::Patch = serde_json::from_value(json!([
            {"op": "add", "path": "/a", "value": 1},
            {"op": "remove", "path": "/b"},
        ]))
        .unwrap();
        let error = PodPatch::try_from(&patch).unwrap_err();
        assert_eq!(error.index, 1);
        assert!(error.to_string().contains("remove"), "{error}");
    }
}
