//! Pods that appear without the injected label in an opted-in namespace
//! (created while the webhook was down, or by a path it does not see) trigger
//! their namespace's reconcile at once, instead of at the next resync. Each
//! pod triggers once when first seen, however often it changes afterwards,
//! and once more when it is deleted.

use std::collections::HashSet;

use kube::{Resource, runtime::watcher::Event};

/// The pods seen so far (by uid), and what a re-list has found of them.
#[derive(Debug, Default)]
pub struct PodSightings {
    seen: HashSet<String>,
    relisting: Option<HashSet<String>>,
}

impl PodSightings {
    /// Takes one watch event of uninjected pods; returns the namespace to
    /// reconcile when it shows a pod for the first time in a namespace that
    /// `opted_in` accepts.
    pub fn observe<K: Resource>(
        &mut self,
        event: Event<K>,
        opted_in: impl Fn(&str) -> bool,
    ) -> Option<String> {
        match event {
            Event::Init => {
                self.relisting = Some(HashSet::new());
                None
            }
            Event::InitApply(pod) => {
                let (uid, namespace) = identity(&pod)?;
                if !opted_in(&namespace) {
                    return None;
                }
                let first = !self.seen.contains(&uid);
                self.relisting.get_or_insert_with(HashSet::new).insert(uid);
                first.then_some(namespace)
            }
            Event::InitDone => {
                // Pods deleted while the watch was down are forgotten here.
                self.seen = self.relisting.take().unwrap_or_default();
                None
            }
            Event::Apply(pod) => {
                let (uid, namespace) = identity(&pod)?;
                (opted_in(&namespace) && self.seen.insert(uid)).then_some(namespace)
            }
            // The namespace's count of uninjected pods drops at once.
            Event::Delete(pod) => {
                let (uid, namespace) = identity(&pod)?;
                self.seen.remove(&uid).then_some(namespace)
            }
        }
    }

    /// Pods remembered (for tests and the curious).
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

fn identity<K: Resource>(pod: &K) -> Option<(String, String)> {
    let meta = pod.meta();
    Some((meta.uid.clone()?, meta.namespace.clone()?))
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::Pod;
    use kube::{api::ObjectMeta, core::PartialObjectMeta};

    use super::*;

    fn pod(uid: &str, namespace: &str) -> PartialObjectMeta<Pod> {
        PartialObjectMeta {
            types: None,
            metadata: ObjectMeta {
                name: Some(format!("pod-{uid}")),
                namespace: Some(namespace.into()),
                uid: Some(uid.into()),
                ..Default::default()
            },
            _phantom: Default::default(),
        }
    }

    fn chiller(namespace: &str) -> bool {
        namespace == "chiller"
    }

    #[test]
    fn a_new_pod_in_an_opted_in_namespace_triggers_once() {
        let mut sightings = PodSightings::default();
        assert_eq!(
            sightings.observe(Event::Apply(pod("a", "chiller")), chiller),
            Some("chiller".into())
        );
        // Status updates of the same pod do not trigger again.
        assert_eq!(
            sightings.observe(Event::Apply(pod("a", "chiller")), chiller),
            None
        );
        assert_eq!(
            sightings.observe(Event::Apply(pod("b", "chiller")), chiller),
            Some("chiller".into())
        );
    }

    #[test]
    fn pods_elsewhere_never_trigger_and_are_not_remembered() {
        let mut sightings = PodSightings::default();
        assert_eq!(
            sightings.observe(Event::Apply(pod("a", "kube-system")), chiller),
            None
        );
        assert!(sightings.is_empty());
    }

    #[test]
    fn a_deleted_pod_triggers_and_is_forgotten() {
        let mut sightings = PodSightings::default();
        sightings.observe(Event::Apply(pod("a", "chiller")), chiller);
        assert_eq!(
            sightings.observe(Event::Delete(pod("a", "chiller")), chiller),
            Some("chiller".into())
        );
        assert!(sightings.is_empty());
        assert_eq!(
            sightings.observe(Event::Delete(pod("z", "kube-system")), chiller),
            None,
            "pods never counted do not trigger"
        );
    }

    #[test]
    fn a_relist_triggers_only_for_pods_not_seen_before_and_drops_vanished_ones() {
        let mut sightings = PodSightings::default();
        sightings.observe(Event::Apply(pod("known", "chiller")), chiller);
        sightings.observe(Event::Apply(pod("vanished", "chiller")), chiller);

        assert_eq!(
            sightings.observe(Event::<PartialObjectMeta<Pod>>::Init, chiller),
            None
        );
        assert_eq!(
            sightings.observe(Event::InitApply(pod("known", "chiller")), chiller),
            None
        );
        assert_eq!(
            sightings.observe(Event::InitApply(pod("new", "chiller")), chiller),
            Some("chiller".into())
        );
        assert_eq!(
            sightings.observe(Event::InitApply(pod("x", "default")), chiller),
            None
        );
        assert_eq!(
            sightings.observe(Event::<PartialObjectMeta<Pod>>::InitDone, chiller),
            None
        );

        assert_eq!(sightings.len(), 2, "known and new; vanished is gone");
        assert_eq!(
            sightings.observe(Event::Apply(pod("new", "chiller")), chiller),
            None
        );
        assert_eq!(
            sightings.observe(Event::Apply(pod("vanished", "chiller")), chiller),
            Some("chiller".into()),
            "a pod forgotten by the relist counts as new if it shows up again"
        );
    }
}
