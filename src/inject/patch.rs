//! The injector's JSON Patch: `add` and `replace` operations, the only ones
//! it writes. Values built for each pod are JSON values; the sidecar and its
//! volume are [`Prebuilt`] once per config, with their JSON text, so a
//! review shares them instead of copying, and writes their text as is.

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

impl PodPatch {
    /// Appends the patch's JSON to `out`, byte for byte what its `Serialize`
    /// gives through serde_json, without the serializer: the fixed parts as
    /// bytes, prebuilt values as their text.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        out.push(b'[');
        for (index, operation) in self.0.iter().enumerate() {
            if index > 0 {
                out.push(b',');
            }
            out.extend_from_slice(match operation.op {
                Op::Add => br#"{"op":"add","path":"#,
                Op::Replace => br#"{"op":"replace","path":"#,
            });
            write_json_string(out, operation.path.as_str());
            out.extend_from_slice(br#","value":"#);
            match &operation.value {
                PatchValue::Json(value) => write_json_value(out, value),
                PatchValue::Prebuilt(prebuilt) => out.extend_from_slice(prebuilt.text().as_bytes()),
            }
            out.push(b'}');
        }
        out.push(b']');
    }
}

/// Appends `s` as a JSON string, byte for byte as serde_json writes it; as
/// is when it has nothing to escape (a quote, a backslash or a control
/// character).
pub fn write_json_string(out: &mut Vec<u8>, s: &str) {
    // Without early exit, so that the check runs over whole vectors.
    let needs_escape = s.bytes().fold(false, |any, b| {
        any | (b < 0x20) | (b == b'"') | (b == b'\\')
    });
    if needs_escape {
        write_escaped(out, s.as_bytes());
    } else {
        out.reserve(s.len() + 2);
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    }
}

/// Appends `value` as serde_json writes it (compact, keys in the map's
/// order), with this module's string writer.
fn write_json_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(number) => {
            serde_json::to_writer(&mut *out, number).expect("a JSON number serializes")
        }
        Value::String(text) => write_json_string(out, text),
        Value::Array(items) => {
            out.push(b'[');
            for (index, item) in items.iter().enumerate() {
                if index > 0 {
                    out.push(b',');
                }
                write_json_value(out, item);
            }
            out.push(b']');
        }
        Value::Object(map) => {
            out.push(b'{');
            for (index, (key, item)) in map.iter().enumerate() {
                if index > 0 {
                    out.push(b',');
                }
                write_json_string(out, key);
                out.push(b':');
                write_json_value(out, item);
            }
            out.push(b'}');
        }
    }
}

/// Appends `items` as a JSON array of strings, as serde_json writes it.
pub fn write_json_string_array<S: AsRef<str>>(out: &mut Vec<u8>, items: &[S]) {
    out.push(b'[');
    for (index, item) in items.iter().enumerate() {
        if index > 0 {
            out.push(b',');
        }
        write_json_string(out, item.as_ref());
    }
    out.push(b']');
}

/// How each byte is escaped in a JSON string: 0 for not at all, `u` for
/// `\u00xx`, else the letter after the backslash (serde_json's choices).
const ESCAPES: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut byte = 0;
    while byte < 0x20 {
        table[byte] = b'u';
        byte += 1;
    }
    table[0x08] = b'b';
    table[b'\t' as usize] = b't';
    table[b'\n' as usize] = b'n';
    table[0x0c] = b'f';
    table[b'\r' as usize] = b'r';
    table[b'"' as usize] = b'"';
    table[b'\\' as usize] = b'\\';
    table
};

/// Appends `bytes` as a JSON string, escaped as serde_json escapes them;
/// runs between escapes are copied whole.
fn write_escaped(out: &mut Vec<u8>, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.reserve(bytes.len() + 16);
    out.push(b'"');
    let mut copied = 0;
    for (at, &byte) in bytes.iter().enumerate() {
        let escape = ESCAPES[usize::from(byte)];
        if escape == 0 {
            continue;
        }
        out.extend_from_slice(&bytes[copied..at]);
        copied = at + 1;
        if escape == b'u' {
            let hex = [HEX[usize::from(byte >> 4)], HEX[usize::from(byte & 0xf)]];
            out.extend_from_slice(&[b'\\', b'u', b'0', b'0', hex[0], hex[1]]);
        } else {
            out.extend_from_slice(&[b'\\', escape]);
        }
    }
    out.extend_from_slice(&bytes[copied..]);
    out.push(b'"');
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
        let mut written = Vec::new();
        patch.write_json(&mut written);
        assert_eq!(written, serde_json::to_vec(&patch).unwrap());
        assert_eq!(PodPatch::try_from(&patch.to_json_patch()).unwrap(), patch);
    }

    #[test]
    fn values_of_every_kind_are_written_as_serde_json_writes_them() {
        let value = json!({
            "name": "GUNICORN_CMD_ARGS", "value": "--statsd-host=\"localhost:9125\"",
            "n": null, "t": true, "f": false, "ints": [0, -7, 18446744073709551615u64],
            "floats": [0.5, -1e300, 3.0], "nested": {"empty": {}, "list": [[], [{}]]},
            "keys \"escaped\"\n": "é"
        });
        let patch = PodPatch(vec![Operation::add(
            pointer("/spec/containers/0/env/-"),
            value,
        )]);
        let mut written = Vec::new();
        patch.write_json(&mut written);
        assert_eq!(
            String::from_utf8(written).unwrap(),
            serde_json::to_string(&patch).unwrap()
        );
    }

    #[test]
    fn strings_are_written_as_serde_json_writes_them() {
        for s in [
            "plain",
            "",
            "a\"b",
            "back\\slash",
            "tab\there",
            "\u{1}",
            "é ✓",
            "\u{7f}",
        ] {
            let mut written = Vec::new();
            write_json_string(&mut written, s);
            assert_eq!(written, serde_json::to_vec(s).unwrap(), "{s:?}");
        }
        // Every ASCII character alone, between others, and all together.
        let all: String = (0u8..0x80).map(char::from).collect();
        let each = (0u8..0x80).map(|b| format!("a{}z", char::from(b)));
        for s in each.chain([all, r#"{"prefix":"x","containers":["a\b"]}"#.into()]) {
            let mut written = Vec::new();
            write_json_string(&mut written, &s);
            assert_eq!(written, serde_json::to_vec(&s).unwrap(), "{s:?}");
        }
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
