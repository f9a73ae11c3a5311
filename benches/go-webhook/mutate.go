package main

import (
	"context"
	"encoding/json"
	"net/http"
	"strings"

	admissionv1 "k8s.io/api/admission/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/util/intstr"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"sigs.k8s.io/controller-runtime/pkg/webhook/admission"
)

// The keys and values chiller-metrics writes with its default config.
const (
	domain            = "metrics.chiller.io"
	injectedLabel     = domain + "/injected"
	statusAnnotation  = domain + "/status"
	mappingAnnotation = domain + "/statsd-mapping"
	defaultContainer  = "kubectl.kubernetes.io/default-container"
	sidecarName       = "statsd-exporter"
	mappingVolume     = "chiller-metrics-statsd-mapping"
	gunicornArgs      = "GUNICORN_CMD_ARGS"
	statsdHostFlag    = "--statsd-host"
	// The hashes of the default config and sidecar, as chiller-metrics 0.1.0 writes them.
	configHash  = "1a527868ab"
	sidecarHash = "f003187f7b"
)

// injector adds the statsd_exporter sidecar the way chiller-metrics does, as
// a controller-runtime webhook is usually written: decode the pod, change the
// typed object, and let PatchResponseFromRaw diff it against the request.
type injector struct {
	decoder admission.Decoder
	mapping string
}

func newInjector(mapping string) *injector {
	scheme := runtime.NewScheme()
	if err := clientgoscheme.AddToScheme(scheme); err != nil {
		panic(err)
	}
	return &injector{decoder: admission.NewDecoder(scheme), mapping: mapping}
}

var _ admission.Handler = (*injector)(nil)

func (in *injector) Handle(_ context.Context, req admission.Request) admission.Response {
	if req.Operation != admissionv1.Create || req.Kind.Kind != "Pod" || req.SubResource != "" {
		return admission.Allowed("not a pod create")
	}
	pod := &corev1.Pod{}
	if err := in.decoder.Decode(req, pod); err != nil {
		return admission.Errored(http.StatusBadRequest, err)
	}
	if pod.Labels[injectedLabel] == "true" {
		return admission.Allowed("already injected")
	}
	prefix := statsdPrefix(pod)
	flags := "--statsd-host=localhost:9125 --statsd-prefix=" + prefix
	names := make([]string, 0, len(pod.Spec.Containers))
	for i := range pod.Spec.Containers {
		c := &pod.Spec.Containers[i]
		if !setGunicornArgs(c, flags) {
			continue
		}
		names = append(names, c.Name)
	}
	if len(names) == 0 {
		return admission.Allowed("no gunicorn container to configure")
	}
	pod.Spec.InitContainers = append(pod.Spec.InitContainers, sidecar())
	pod.Spec.Volumes = append(pod.Spec.Volumes, volume())
	if pod.Labels == nil {
		pod.Labels = map[string]string{}
	}
	pod.Labels[injectedLabel] = "true"
	status, err := json.Marshal(struct {
		Version     string   `json:"version"`
		Sidecar     string   `json:"sidecar"`
		Mode        string   `json:"mode"`
		Prefix      string   `json:"prefix"`
		Containers  []string `json:"containers"`
		ConfigHash  string   `json:"configHash"`
		SidecarHash string   `json:"sidecarHash"`
	}{"0.1.0", sidecarName, "native", prefix, names, configHash, sidecarHash})
	if err != nil {
		return admission.Errored(http.StatusInternalServerError, err)
	}
	if pod.Annotations == nil {
		pod.Annotations = map[string]string{}
	}
	pod.Annotations[statusAnnotation] = string(status)
	pod.Annotations[mappingAnnotation] = in.mapping
	if _, ok := pod.Annotations[defaultContainer]; !ok {
		pod.Annotations[defaultContainer] = pod.Spec.Containers[0].Name
	}
	marshaled, err := json.Marshal(pod)
	if err != nil {
		return admission.Errored(http.StatusInternalServerError, err)
	}
	return admission.PatchResponseFromRaw(req.Object.Raw, marshaled)
}

// setGunicornArgs appends the statsd flags to the container's
// GUNICORN_CMD_ARGS; false when the container cannot take them.
func setGunicornArgs(c *corev1.Container, flags string) bool {
	for _, part := range append(append([]string{}, c.Command...), c.Args...) {
		if strings.Contains(part, statsdHostFlag) {
			return false
		}
	}
	for i := len(c.Env) - 1; i >= 0; i-- {
		if c.Env[i].Name != gunicornArgs {
			continue
		}
		if c.Env[i].ValueFrom != nil || strings.Contains(c.Env[i].Value, statsdHostFlag) {
			return false
		}
		if kept := strings.TrimRight(c.Env[i].Value, " \t\n"); kept != "" {
			c.Env[i].Value = kept + " " + flags
		} else {
			c.Env[i].Value = flags
		}
		return true
	}
	c.Env = append(c.Env, corev1.EnvVar{Name: gunicornArgs, Value: flags})
	return true
}

// statsdPrefix: the recommended labels, the `app` label, the owner's name,
// then the pod's name or generateName, without the pod-template-hash.
func statsdPrefix(pod *corev1.Pod) string {
	hash := pod.Labels["pod-template-hash"]
	strip := func(name string) string {
		if hash != "" {
			return strings.TrimSuffix(name, "-"+hash)
		}
		return name
	}
	var candidates []string
	name, component := pod.Labels["app.kubernetes.io/name"], pod.Labels["app.kubernetes.io/component"]
	switch {
	case name != "" && component != "":
		candidates = append(candidates, name+"-"+component)
	case name != "":
		candidates = append(candidates, name)
	case component != "":
		candidates = append(candidates, component)
	}
	candidates = append(candidates, pod.Labels["app"])
	for _, owner := range pod.OwnerReferences {
		if owner.Controller != nil && *owner.Controller {
			candidates = append(candidates, strip(owner.Name))
		}
	}
	candidates = append(candidates, pod.Name, strip(strings.TrimRight(pod.GenerateName, "-")))
	for _, candidate := range candidates {
		if p := sanitize(candidate); p != "" {
			return p
		}
	}
	return "app"
}

func sanitize(raw string) string {
	var b strings.Builder
	for _, c := range strings.TrimSpace(raw) {
		if b.Len() == 63 {
			break
		}
		if c < 128 && (c == '-' || c == '_' || c >= '0' && c <= '9' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z') {
			b.WriteRune(c)
		} else {
			b.WriteByte('_')
		}
	}
	return strings.Trim(b.String(), "-_")
}

func sidecar() corev1.Container {
	always := corev1.ContainerRestartPolicyAlways
	no, yes := false, true
	nobody := int64(65534)
	probe := func(path string, port, period, failures int32) *corev1.Probe {
		return &corev1.Probe{
			ProbeHandler:     corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: path, Port: intstr.FromInt32(port)}},
			PeriodSeconds:    period,
			TimeoutSeconds:   2,
			FailureThreshold: failures,
		}
	}
	return corev1.Container{
		Name:  sidecarName,
		Image: "prom/statsd-exporter:v0.28.0",
		Args: []string{
			"--statsd.mapping-config=/etc/statsd-exporter/statsd-mapping.yaml",
			"--statsd.listen-udp=:9125",
			"--statsd.listen-tcp=:9125",
			"--web.listen-address=:9102",
		},
		ImagePullPolicy: corev1.PullIfNotPresent,
		LivenessProbe:   probe("/-/healthy", 9102, 20, 3),
		ReadinessProbe:  probe("/-/ready", 9102, 10, 3),
		StartupProbe:    probe("/-/ready", 9102, 1, 30),
		Ports: []corev1.ContainerPort{
			{Name: "statsd-metrics", ContainerPort: 9102, Protocol: corev1.ProtocolTCP},
			{ContainerPort: 9125, Protocol: corev1.ProtocolUDP},
			{ContainerPort: 9125, Protocol: corev1.ProtocolTCP},
		},
		Resources: corev1.ResourceRequirements{
			Limits: corev1.ResourceList{corev1.ResourceMemory: resource.MustParse("64Mi")},
			Requests: corev1.ResourceList{
				corev1.ResourceCPU:    resource.MustParse("10m"),
				corev1.ResourceMemory: resource.MustParse("24Mi"),
			},
		},
		RestartPolicy: &always,
		SecurityContext: &corev1.SecurityContext{
			AllowPrivilegeEscalation: &no,
			Capabilities:             &corev1.Capabilities{Drop: []corev1.Capability{"ALL"}},
			ReadOnlyRootFilesystem:   &yes,
			RunAsGroup:               &nobody,
			RunAsNonRoot:             &yes,
			RunAsUser:                &nobody,
			SeccompProfile:           &corev1.SeccompProfile{Type: corev1.SeccompProfileTypeRuntimeDefault},
		},
		TerminationMessagePolicy: corev1.TerminationMessageFallbackToLogsOnError,
		VolumeMounts:             []corev1.VolumeMount{{Name: mappingVolume, MountPath: "/etc/statsd-exporter", ReadOnly: true}},
	}
}

func volume() corev1.Volume {
	return corev1.Volume{
		Name: mappingVolume,
		VolumeSource: corev1.VolumeSource{DownwardAPI: &corev1.DownwardAPIVolumeSource{
			Items: []corev1.DownwardAPIVolumeFile{{
				Path:     "statsd-mapping.yaml",
				FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.annotations['" + mappingAnnotation + "']"},
			}},
		}},
	}
}
