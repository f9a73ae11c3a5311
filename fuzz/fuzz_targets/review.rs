//! The whole request path: bytes in → `admission::review` (parse, mutate,
//! verify the patch) → response serialization. Must never panic, and every
//! answer must be a well-formed AdmissionReview.
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
    let Ok((review, _outcome)) = admission::review(&INJECTOR, &NoCluster, body) else {
        return;
    };
    let json = admission::to_json(&review);
    let bytes = serde_json::to_vec(&json).expect("a response always serializes");
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
});
