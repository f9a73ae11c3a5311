package main

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"testing"

	jsonpatch "github.com/evanphx/json-patch/v5"
	gomodules "gomodules.xyz/jsonpatch/v2"
	admissionv1 "k8s.io/api/admission/v1"
	"sigs.k8s.io/controller-runtime/pkg/webhook/admission"
)

const repo = "../.."

// The fixtures the benchmarks send, and others of the golden files this
// webhook covers: it must leave each pod exactly as chiller-metrics does
// (tests/golden/expected/NAME.json, `patchedPod`, which tests/golden.rs
// checks against chiller-metrics itself).
var fixtures = []string{"chiller-api", "chiller-frontend", "bare-pod", "dry-run", "already-injected"}

func TestTheGoWebhookLeavesEachFixturePodAsChillerMetricsDoes(t *testing.T) {
	mapping, err := os.ReadFile(filepath.Join(repo, "src/inject/statsd-mapping.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	handler := newInjector(string(mapping))
	for _, name := range fixtures {
		t.Run(name, func(t *testing.T) {
			var review admissionv1.AdmissionReview
			readJSON(t, filepath.Join(repo, "tests/golden/requests", name+".json"), &review)
			var expected struct {
				PatchedPod json.RawMessage `json:"patchedPod"`
			}
			readJSON(t, filepath.Join(repo, "tests/golden/expected", name+".json"), &expected)

			response := handler.Handle(context.Background(), admission.Request{AdmissionRequest: *review.Request})
			if !response.Allowed {
				t.Fatalf("denied: %v", response.Result)
			}
			pod := []byte(review.Request.Object.Raw)
			if len(response.Patches) > 0 {
				patchJSON, err := json.Marshal(response.Patches)
				if err != nil {
					t.Fatal(err)
				}
				patch, err := jsonpatch.DecodePatch(patchJSON)
				if err != nil {
					t.Fatal(err)
				}
				if pod, err = patch.Apply(pod); err != nil {
					t.Fatalf("applying %s: %v", patchJSON, err)
				}
			}
			if expected.PatchedPod == nil {
				// chiller-metrics left the pod as it was.
				expected.PatchedPod = review.Request.Object.Raw
			}
			got, want := podJSON(t, pod), podJSON(t, expected.PatchedPod)
			if !reflect.DeepEqual(got, want) {
				gotText, _ := json.Marshal(got)
				wantText, _ := json.Marshal(want)
				diff, _ := gomodules.CreatePatch(wantText, gotText)
				t.Fatalf("the pod differs from chiller-metrics' by %v", diff)
			}
		})
	}
}

func readJSON(t *testing.T, path string, into any) {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(data, into); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
}

// podJSON decodes a pod, without `creationTimestamp: null`: the typed Pod
// omits it, so PatchResponseFromRaw removes it, and null and absent mean the
// same to the API server (it sets the field after admission).
func podJSON(t *testing.T, text []byte) map[string]any {
	t.Helper()
	var pod map[string]any
	if err := json.Unmarshal(text, &pod); err != nil {
		t.Fatal(err)
	}
	if metadata, ok := pod["metadata"].(map[string]any); ok {
		if stamp, present := metadata["creationTimestamp"]; present && stamp == nil {
			delete(metadata, "creationTimestamp")
		}
	}
	return pod
}
