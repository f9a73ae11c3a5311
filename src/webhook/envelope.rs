//! Reading an AdmissionReview body in one pass.
//!
//! The API server writes `kind`, `subResource` and `operation` before
//! `object`, so by the time the pod arrives we know whether it is a pod
//! CREATE. If it is, the pod's [`PodView`] is read right there, from the
//! same scan of the body; otherwise the object is skipped without
//! allocating. An `object` that comes before those fields (no API server
//! writes one) is kept as raw JSON and viewed once the request is known.
//! Everything else (`oldObject`, `options`, `userInfo`, ...) is skipped.

use std::{borrow::Cow, cell::Cell, fmt};

use kube::core::admission::Operation;
use serde::{
    Deserialize, Deserializer,
    de::{DeserializeSeed, IgnoredAny, MapAccess, Visitor},
};
use serde_json::value::RawValue;

use crate::inject::PodView;

/// The parts of an AdmissionReview this webhook reads.
pub struct Envelope<'a> {
    pub api_version: Cow<'a, str>,
    pub kind: Cow<'a, str>,
    pub request: Option<Request<'a>>,
}

pub struct Request<'a> {
    pub uid: Cow<'a, str>,
    pub kind: Kind<'a>,
    pub sub_resource: Option<Cow<'a, str>>,
    pub operation: Operation,
    pub namespace: Option<Cow<'a, str>>,
    pub object: Object<'a>,
}

#[derive(Deserialize)]
pub struct Kind<'a> {
    #[serde(borrow, default)]
    pub group: Cow<'a, str>,
    #[serde(borrow, default)]
    pub version: Cow<'a, str>,
    #[serde(borrow, default)]
    pub kind: Cow<'a, str>,
}

pub enum Object<'a> {
    Absent,
    /// Read in the same pass: the request was already known to be a pod CREATE.
    Pod(Box<PodView<'a>>),
    /// Skipped: the request is not a pod CREATE.
    Skipped,
    /// Came before the fields that say what the request is.
    Raw(&'a RawValue),
}

impl Request<'_> {
    /// `v1/Pod`, not a subresource.
    pub fn is_pod(&self) -> bool {
        is_pod(&self.kind, self.sub_resource.as_deref())
    }
}

fn is_pod(kind: &Kind<'_>, sub_resource: Option<&str>) -> bool {
    kind.group.is_empty()
        && kind.version == "v1"
        && kind.kind == "Pod"
        && sub_resource.is_none_or(str::is_empty)
}

/// How reading a body failed.
pub enum EnvelopeError {
    /// Not an AdmissionReview (not JSON, or the wrong shape).
    Malformed(serde_json::Error),
    /// Valid JSON, but `request.object` is not a pod.
    InvalidPod(serde_json::Error),
}

/// Reads `body` in one pass.
///
/// A body that is UTF-8 throughout (every body the API server sends) is
/// checked once, here, and read as text, so the parser does not check each
/// string again. Any other body is read as bytes, which gives the same
/// answers and errors as before: bytes that are not UTF-8 are an error
/// only inside a string the webhook reads.
pub fn parse(body: &[u8]) -> Result<Envelope<'_>, EnvelopeError> {
    match std::str::from_utf8(body) {
        Ok(text) => parse_from(serde_json::Deserializer::from_str(text)),
        Err(_) => parse_from(serde_json::Deserializer::from_slice(body)),
    }
}

fn parse_from<'de, R: serde_json::de::Read<'de>>(
    mut deserializer: serde_json::Deserializer<R>,
) -> Result<Envelope<'de>, EnvelopeError> {
    let pod_failed = Cell::new(false);
    let envelope = EnvelopeSeed {
        pod_failed: &pod_failed,
    }
    .deserialize(&mut deserializer)
    .and_then(|envelope| deserializer.end().map(|()| envelope));
    envelope.map_err(|error| {
        // A type error inside the pod is the pod's; broken JSON is the body's.
        if pod_failed.get() && error.classify() == serde_json::error::Category::Data {
            EnvelopeError::InvalidPod(error)
        } else {
            EnvelopeError::Malformed(error)
        }
    })
}

/// Views an `object` that came before the request said what it is.
pub fn view_raw(object: &RawValue) -> Result<PodView<'_>, serde_json::Error> {
    serde_json::from_str(object.get())
}

#[derive(Clone, Copy)]
struct EnvelopeSeed<'c> {
    pod_failed: &'c Cell<bool>,
}

#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "camelCase")]
enum EnvelopeField {
    ApiVersion,
    Kind,
    Request,
    #[serde(other)]
    Other,
}

impl<'de> DeserializeSeed<'de> for EnvelopeSeed<'_> {
    type Value = Envelope<'de>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for EnvelopeSeed<'_> {
    type Value = Envelope<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an AdmissionReview object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let (mut api_version, mut kind, mut request) = (None, None, None);
        while let Some(field) = map.next_key()? {
            match field {
                EnvelopeField::ApiVersion => once(&mut api_version, "apiVersion", || {
                    map.next_value::<Option<Borrowed>>()
                })?,
                EnvelopeField::Kind => {
                    once(&mut kind, "kind", || map.next_value::<Option<Borrowed>>())?
                }
                EnvelopeField::Request => once(&mut request, "request", || {
                    map.next_value_seed(OptionalRequest(RequestSeed {
                        pod_failed: self.pod_failed,
                    }))
                })?,
                EnvelopeField::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(Envelope {
            api_version: api_version.flatten().map(|b| b.0).unwrap_or_default(),
            kind: kind.flatten().map(|b| b.0).unwrap_or_default(),
            request: request.flatten(),
        })
    }
}

/// Sets a field read once; a second occurrence is an error, as serde's
/// derived structs have it.
fn once<T, E: serde::de::Error>(
    slot: &mut Option<T>,
    name: &'static str,
    read: impl FnOnce() -> Result<T, E>,
) -> Result<(), E> {
    if slot.is_some() {
        return Err(E::duplicate_field(name));
    }
    *slot = Some(read()?);
    Ok(())
}

/// A string borrowed from the body when it has no escapes.
struct Borrowed<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Borrowed<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Wrapped<'a>(#[serde(borrow)] Cow<'a, str>);
        Wrapped::deserialize(deserializer).map(|w| Borrowed(w.0))
    }
}

/// `request`, which may be `null`.
struct OptionalRequest<'c>(RequestSeed<'c>);

impl<'de> DeserializeSeed<'de> for OptionalRequest<'_> {
    type Value = Option<Request<'de>>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_option(self)
    }
}

impl<'de> Visitor<'de> for OptionalRequest<'_> {
    type Value = Option<Request<'de>>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an admission request or null")
    }

    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self.0).map(Some)
    }
}

#[derive(Clone, Copy)]
struct RequestSeed<'c> {
    pod_failed: &'c Cell<bool>,
}

#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "camelCase")]
enum RequestField {
    Uid,
    Kind,
    SubResource,
    Operation,
    Namespace,
    Object,
    #[serde(other)]
    Other,
}

impl<'de> Visitor<'de> for RequestSeed<'_> {
    type Value = Request<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an admission request")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut uid: Option<Option<Borrowed>> = None;
        let mut kind: Option<Kind> = None;
        let mut sub_resource: Option<Option<Borrowed>> = None;
        let mut operation: Option<Operation> = None;
        let mut namespace: Option<Option<Borrowed>> = None;
        let mut object: Option<Object> = None;
        while let Some(field) = map.next_key()? {
            match field {
                RequestField::Uid => once(&mut uid, "uid", || map.next_value())?,
                RequestField::Kind => once(&mut kind, "kind", || map.next_value())?,
                RequestField::SubResource => {
                    once(&mut sub_resource, "subResource", || map.next_value())?
                }
                RequestField::Operation => once(&mut operation, "operation", || map.next_value())?,
                RequestField::Namespace => once(&mut namespace, "namespace", || map.next_value())?,
                RequestField::Object => {
                    let sub_resource = sub_resource.as_ref().and_then(|s| s.as_ref());
                    let pod_create = match (&kind, &operation) {
                        (Some(kind), Some(operation)) => Some(
                            *operation == Operation::Create
                                && is_pod(kind, sub_resource.map(|s| &*s.0)),
                        ),
                        _ => None,
                    };
                    once(&mut object, "object", || match pod_create {
                        Some(true) => map.next_value_seed(PodSeed {
                            pod_failed: self.pod_failed,
                        }),
                        Some(false) => map.next_value::<IgnoredAny>().map(|_| Object::Skipped),
                        None => map
                            .next_value::<Option<&RawValue>>()
                            .map(|raw| raw.map_or(Object::Absent, Object::Raw)),
                    })?
                }
                RequestField::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        let text = |field: Option<Option<Borrowed<'de>>>| field.flatten().map(|b| b.0);
        Ok(Request {
            uid: text(uid).unwrap_or_default(),
            kind: kind.ok_or_else(|| serde::de::Error::missing_field("kind"))?,
            sub_resource: text(sub_resource),
            operation: operation.ok_or_else(|| serde::de::Error::missing_field("operation"))?,
            namespace: text(namespace),
            object: object.unwrap_or(Object::Absent),
        })
    }
}

/// `object` of a pod CREATE: the pod's view, read in place.
struct PodSeed<'c> {
    pod_failed: &'c Cell<bool>,
}

impl<'de> DeserializeSeed<'de> for PodSeed<'_> {
    type Value = Object<'de>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        self.pod_failed.set(true);
        let pod = Option::<PodView>::deserialize(deserializer)?;
        self.pod_failed.set(false);
        Ok(pod.map_or(Object::Absent, |pod| Object::Pod(Box::new(pod))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(request_fields: &str) -> String {
        format!(
            r#"{{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{{{request_fields}}}}}"#
        )
    }

    const POD: &str =
        r#"{"metadata":{"name":"p","labels":{"a":"b"}},"spec":{"containers":[{"name":"c"}]}}"#;
    const POD_KIND: &str = r#""kind":{"group":"","version":"v1","kind":"Pod"}"#;

    fn object(body: &str) -> Object<'_> {
        match parse(body.as_bytes()) {
            Ok(envelope) => envelope.request.expect("a request").object,
            Err(_) => panic!("{body} parses"),
        }
    }

    #[test]
    fn a_pod_create_is_viewed_in_the_same_pass() {
        let body = body(&format!(
            r#""uid":"u",{POD_KIND},"operation":"CREATE","object":{POD}"#
        ));
        let Object::Pod(pod) = object(&body) else {
            panic!("viewed in place")
        };
        assert_eq!(pod.label("a"), Some("b"));
    }

    #[test]
    fn an_object_before_the_request_kind_is_kept_raw_and_viewed_later() {
        let body = body(&format!(
            r#""uid":"u","object":{POD},{POD_KIND},"operation":"CREATE""#
        ));
        let envelope = parse(body.as_bytes()).ok().unwrap();
        let request = envelope.request.unwrap();
        assert!(request.is_pod() && request.operation == Operation::Create);
        let Object::Raw(raw) = request.object else {
            panic!("kept raw")
        };
        assert_eq!(view_raw(raw).unwrap().label("a"), Some("b"));
    }

    #[test]
    fn other_objects_are_skipped() {
        for fields in [
            format!(r#"{POD_KIND},"operation":"UPDATE","object":{POD}"#),
            format!(r#"{POD_KIND},"subResource":"status","operation":"CREATE","object":{POD}"#),
            format!(
                r#""kind":{{"group":"apps","version":"v1","kind":"Deployment"}},"operation":"CREATE","object":{POD}"#
            ),
        ] {
            assert!(
                matches!(object(&body(&fields)), Object::Skipped),
                "{fields}"
            );
        }
        let null = body(&format!(r#"{POD_KIND},"operation":"CREATE","object":null"#));
        assert!(matches!(object(&null), Object::Absent));
    }

    #[test]
    fn a_pod_of_the_wrong_shape_is_told_apart_from_broken_json() {
        let wrong_type = body(&format!(
            r#"{POD_KIND},"operation":"CREATE","object":{{"metadata":{{"labels":5}}}}"#
        ));
        assert!(matches!(
            parse(wrong_type.as_bytes()),
            Err(EnvelopeError::InvalidPod(_))
        ));
        let truncated = body(&format!(
            r#"{POD_KIND},"operation":"CREATE","object":{{"metadata":{{"#
        ));
        assert!(matches!(
            parse(truncated.as_bytes()),
            Err(EnvelopeError::Malformed(_))
        ));
        // A type error outside the pod is the envelope's.
        let bad_kind = body(&format!(r#""kind":5,"operation":"CREATE","object":{POD}"#));
        assert!(matches!(
            parse(bad_kind.as_bytes()),
            Err(EnvelopeError::Malformed(_))
        ));
    }

    #[test]
    fn fields_appear_once_and_kind_and_operation_are_required() {
        for fields in [
            format!(r#"{POD_KIND},"operation":"CREATE","object":{POD},"object":{POD}"#),
            format!(r#""uid":"a","uid":"b",{POD_KIND},"operation":"CREATE""#),
            r#""operation":"CREATE""#.to_string(),
            POD_KIND.to_string(),
        ] {
            assert!(
                matches!(
                    parse(body(&fields).as_bytes()),
                    Err(EnvelopeError::Malformed(_))
                ),
                "{fields}"
            );
        }
        let trailing = format!("{} x", body(r#""operation":"CREATE""#));
        assert!(matches!(
            parse(trailing.as_bytes()),
            Err(EnvelopeError::Malformed(_))
        ));
    }
}
