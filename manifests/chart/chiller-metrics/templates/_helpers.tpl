{{- define "chiller-metrics.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "chiller-metrics.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "chiller-metrics.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "chiller-metrics.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "chiller-metrics.selectorLabels" -}}
app.kubernetes.io/name: {{ include "chiller-metrics.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: webhook
{{- end -}}

{{- define "chiller-metrics.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "chiller-metrics.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: chiller-metrics
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Domain of the label and annotation keys (config `domain`). */}}
{{- define "chiller-metrics.domain" -}}
{{- .Values.config.domain | default "metrics.chiller.io" -}}
{{- end -}}

{{- define "chiller-metrics.tlsSecret" -}}
{{- if and (eq .Values.certs.mode "selfManaged") .Values.certs.selfManaged.existingSecret -}}
{{- .Values.certs.selfManaged.existingSecret -}}
{{- else -}}
{{- printf "%s-tls" (include "chiller-metrics.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "chiller-metrics.dnsNames" -}}
{{- $svc := include "chiller-metrics.fullname" . -}}
{{- $ns := .Release.Namespace -}}
{{- list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.cluster.local" $svc $ns) | toJson -}}
{{- end -}}

{{/*
certs.mode=generated: one CA and serving certificate per render, reused from
the existing Secret on upgrades (delete the Secret to rotate). Cached in
.Values so the Secret and the webhook configuration share it.
*/}}
{{- define "chiller-metrics.generatedTLS" -}}
{{- if not (hasKey .Values "generatedTLS") -}}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (include "chiller-metrics.tlsSecret" .) -}}
{{- if and $existing $existing.data (hasKey $existing.data "ca.crt") -}}
{{- $_ := set .Values "generatedTLS" (dict "ca" (index $existing.data "ca.crt") "crt" (index $existing.data "tls.crt") "key" (index $existing.data "tls.key")) -}}
{{- else -}}
{{- $days := int .Values.certs.generated.validityDays -}}
{{- $ca := genCA (printf "%s-ca" (include "chiller-metrics.fullname" .)) $days -}}
{{- $cert := genSignedCert (include "chiller-metrics.fullname" .) nil (include "chiller-metrics.dnsNames" . | fromJsonArray) $days $ca -}}
{{- $_ := set .Values "generatedTLS" (dict "ca" ($ca.Cert | b64enc) "crt" ($cert.Cert | b64enc) "key" ($cert.Key | b64enc)) -}}
{{- end -}}
{{- end -}}
{{- toJson .Values.generatedTLS -}}
{{- end -}}

{{- define "chiller-metrics.validate" -}}
{{- $mode := .Values.certs.mode -}}
{{- if not (has $mode (list "certManager" "selfManaged" "generated")) -}}
{{- fail (printf "certs.mode must be certManager, selfManaged or generated, not %q" $mode) -}}
{{- end -}}
{{- if eq $mode "selfManaged" -}}
{{- if not .Values.certs.selfManaged.caBundle -}}
{{- fail "certs.mode=selfManaged needs certs.selfManaged.caBundle (base64 PEM CA)" -}}
{{- end -}}
{{- if not (or .Values.certs.selfManaged.existingSecret (and .Values.certs.selfManaged.cert .Values.certs.selfManaged.key)) -}}
{{- fail "certs.mode=selfManaged needs certs.selfManaged.existingSecret, or cert and key" -}}
{{- end -}}
{{- end -}}
{{- if not (has .Values.webhook.failurePolicy (list "Ignore" "Fail")) -}}
{{- fail (printf "webhook.failurePolicy must be Ignore or Fail, not %q" .Values.webhook.failurePolicy) -}}
{{- end -}}
{{- end -}}
