//! The whole request path: bytes in → `admission::review` (the envelope, the
//! pod's borrowed view, mutation and the patch check on the view) → the
//! response written to bytes. Must never panic, every answer must be a
//! well-formed AdmissionReview, and a patch it answers must apply to the
//! request's pod as JSON (what the API server does with it). The answer must
//! not depend on where the API server writes `object` in the request, nor
//! on whether the body is read as text (UTF-8 throughout) or as bytes.
#![no_main]

use std::sync::LazyLock;

use chiller_metrics::{
    config::Config,
    inject::{Injector, ResolvedMode},
    webhook::{NoCluster, admission},
};
use libfuzzer_sys::fuzz_target;

static INJECTOR: LazyLock<Injector> =
    LazyLock::new(|| Injector::new(Config::default(), ResolvedMode::Native));

fuzz_target!(|body: &[u8]| {
    let Ok((review, first_outcome)) = admission::review(&INJECTOR, &NoCluster, body) else {
        return;
    };
    let bytes = admission::to_bytes(&review);
    let answer: serde_json::Value = serde_json::from_slice(&bytes).expect("a response is JSON");
    assert_eq!(answer["apiVersion"], admission::API_VERSION);
    assert_eq!(
        answer["response"]["allowed"], true,
        "injection never blocks a pod"
    );
    assert!(
        answer["response"]["uid"]
            .as_str()
            .is_some_and(|uid| !uid.is_empty())
    );
    // With an ignored string that is not UTF-8 in front, the body is read as
    // bytes instead of as text, and must get the same answer.
    if let Some(rest) = body.strip_prefix(b"{")
        && !rest.trim_ascii_start().starts_with(b"}")
    {
        let mut as_bytes = b"{\"ignored\":\"\xff\",".to_vec();
        as_bytes.extend_from_slice(rest);
        match admission::review(&INJECTOR, &NoCluster, &as_bytes) {
            Ok((again, outcome)) => {
                assert_eq!(
                    outcome, first_outcome,
                    "the same outcome as text and as bytes"
                );
                assert_eq!(
                    admission::to_bytes(&again),
                    bytes,
                    "the same answer as text and as bytes"
                );
            }
            Err(error) => panic!("answered as text, refused as bytes: {error}"),
        }
    }
    // The same review re-written by serde_json, whose sorted maps put
    // `object` before `operation`, reaches the pod's view the other way (kept
    // raw, viewed after the envelope) and must get the same answer.
    // (serde_json's Value stops at depth 128, where the review skipped.)
    if let Ok(value) = serde_json::from_slice::<serde_json::Value>(body) {
        let reordered = serde_json::to_vec(&value).expect("a value serializes");
        match admission::review(&INJECTOR, &NoCluster, &reordered) {
            Ok((again, outcome)) => {
                assert_eq!(outcome, first_outcome, "the same outcome either way");
                assert_eq!(
                    admission::to_bytes(&again),
                    bytes,
                    "the same answer either way"
                );
            }
            Err(error) => panic!("answered in one order, refused in the other: {error}"),
        }
    }
    if let Some(encoded) = answer["response"]["patch"].as_str() {
        use base64::{Engine, engine::general_purpose::STANDARD};
        let patch: json_patch::Patch =
            serde_json::from_slice(&STANDARD.decode(encoded).expect("the patch is base64"))
                .expect("the patch is a JSON Patch");
        // serde_json's Value stops at depth 128, where the review skipped.
        let Ok(request) = serde_json::from_slice::<serde_json::Value>(body) else {
            return;
        };
        let mut pod = request["request"]["object"].clone();
        if let Err(error) = json_patch::patch(&mut pod, &patch) {
            panic!("the answered patch does not apply to the pod: {error}");
        }
    }
});
