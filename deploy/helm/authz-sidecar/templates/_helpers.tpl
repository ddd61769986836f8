{{- define "authz-sidecar.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The name of every object; the Service's is what Envoy and Istio's mesh config must name. */}}
{{- define "authz-sidecar.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "authz-sidecar.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The Check Service's in-cluster DNS name (gateway topology). */}}
{{- define "authz-sidecar.serviceHost" -}}
{{- printf "%s.%s.svc.cluster.local" (include "authz-sidecar.fullname" .) .Release.Namespace -}}
{{- end -}}

{{- define "authz-sidecar.selectorLabels" -}}
app.kubernetes.io/name: {{ include "authz-sidecar.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: {{ ternary "gateway" "authz" (eq .Values.topology "sidecar") }}
{{- end -}}

{{- define "authz-sidecar.labels" -}}
{{ include "authz-sidecar.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* A duration as the binary reads it (250ms, 10s, 5m, 24h; a bare number is seconds), in
seconds. Anything else fails the render rather than skewing the grace-period check. */}}
{{- define "authz-sidecar.seconds" -}}
{{- $value := trim (toString .) -}}
{{- $number := regexFind "^[0-9]+(\\.[0-9]+)?" $value -}}
{{- $unit := trimPrefix $number $value -}}
{{- $factors := dict "ms" 0.001 "" 1.0 "s" 1.0 "m" 60.0 "h" 3600.0 -}}
{{- if or (eq $number "") (not (hasKey $factors $unit)) -}}
{{- fail (printf "%q is not a duration such as 250ms, 10s, 5m or 24h" $value) -}}
{{- end -}}
{{- mulf (float64 $number) (get $factors $unit) -}}
{{- end -}}

{{/* Paths and names the templates share. */}}
{{- define "authz-sidecar.socketDir" -}}/var/run/authz-sidecar{{- end -}}
{{- define "authz-sidecar.socketPath" -}}{{ include "authz-sidecar.socketDir" . }}/check.sock{{- end -}}
{{- define "authz-sidecar.tlsDir" -}}/etc/authz/tls{{- end -}}
{{- define "authz-sidecar.clientCADir" -}}/etc/authz/client-ca{{- end -}}
{{- define "authz-sidecar.redisTlsDir" -}}/etc/authz/redis-tls{{- end -}}
{{- define "authz-sidecar.tlsSecret" -}}
{{- if .Values.tls.certManager.enabled -}}
{{- printf "%s-tls" (include "authz-sidecar.fullname" .) -}}
{{- else -}}
{{- required "tls.enabled without tls.certManager: set tls.existingSecret (a kubernetes.io/tls Secret)" .Values.tls.existingSecret -}}
{{- end -}}
{{- end -}}

{{/* TLS on the Check listener: the chart's files, or GRPC_TLS_CERT set by hand. */}}
{{- define "authz-sidecar.tlsOn" -}}
{{- if or .Values.tls.enabled .Values.env.GRPC_TLS_CERT -}}true{{- end -}}
{{- end -}}

{{/* The most pods the Deployment may have at once: what the HPA or KEDA may scale to, else
replicaCount. */}}
{{- define "authz-sidecar.maxReplicas" -}}
{{- if .Values.autoscaling.keda.enabled -}}
{{- .Values.autoscaling.keda.maxReplicas -}}
{{- else if .Values.autoscaling.enabled -}}
{{- .Values.autoscaling.maxReplicas -}}
{{- else -}}
{{- .Values.replicaCount -}}
{{- end -}}
{{- end -}}

{{/* Refusals a schema cannot express; included once, from the Deployment. */}}
{{- define "authz-sidecar.checks" -}}
{{- $env := .Values.env -}}
{{- /* Settings the chart derives: one source each, so the ports, Service, probes and NetworkPolicy
cannot disagree with the listener. The schema lets them through only so that this can say why. */}}
{{- $derived := dict "GRPC_LISTEN_ADDR" "service.grpcPort (the container port, Service, probes and NetworkPolicy follow it)" "METRICS_LISTEN_ADDR" "service.metricsPort (the container port, Service, probes and NetworkPolicy follow it)" "GRPC_UNIX_SOCKET" "topology (sidecar: a socket on the emptyDir Envoy shares)" "BACKCHANNEL_LOGOUT_LISTEN_ADDR" "backchannelLogout.enabled and backchannelLogout.port (the container port, Service and NetworkPolicy follow them)" "BACKCHANNEL_LOGOUT_CLIENT_ID" "backchannelLogout.clientId (passed on while backchannelLogout.enabled)" "BACKCHANNEL_LOGOUT_ISSUERS" "backchannelLogout.issuers (passed on while backchannelLogout.enabled)" -}}
{{- range $name := keys $derived | sortAlpha -}}
{{- if ne (toString (get $env $name)) "" -}}
{{- fail (printf "env.%s is set by the chart from %s: set that instead and leave env.%s out (or empty)" $name (get $derived $name) $name) -}}
{{- end -}}
{{- end -}}
{{- $logout := .Values.backchannelLogout -}}
{{- if $logout.enabled -}}
{{- if not $logout.clientId -}}
{{- fail "backchannelLogout.enabled needs backchannelLogout.clientId: this relying party's client id at the IdP, which every logout token's aud must contain (the sidecar refuses to start without it)" -}}
{{- end -}}
{{- $taken := dict (toString .Values.service.grpcPort) "service.grpcPort" (toString .Values.service.metricsPort) "service.metricsPort" -}}
{{- if eq .Values.topology "sidecar" -}}
{{- $_ := set $taken (toString .Values.envoy.port) "envoy.port" -}}
{{- $_ := set $taken (toString .Values.envoy.healthPort) "envoy.healthPort" -}}
{{- $_ := set $taken (toString .Values.envoy.adminPort) "envoy.adminPort" -}}
{{- end -}}
{{- if hasKey $taken (toString $logout.port) -}}
{{- fail (printf "backchannelLogout.port (%v) is also %s: the logout endpoint needs a port of its own" $logout.port (get $taken (toString $logout.port))) -}}
{{- end -}}
{{- if and .Values.networkPolicy.enabled (empty $logout.from) -}}
{{- fail "backchannelLogout.from is empty: list who may POST logout tokens (the IdP, or what forwards its requests) as NetworkPolicy peers; to admit any source on purpose, `- ipBlock: { cidr: 0.0.0.0/0 }`" -}}
{{- end -}}
{{- if .Values.revocationFile.enabled -}}
{{- fail "backchannelLogout.enabled with revocationFile.enabled: a logout is written into REVOCATION_FILE, which the chart mounts read-only from a ConfigMap, so every logout would fail (503); use REVOCATION_BACKEND=redis" -}}
{{- end -}}
{{- end -}}
{{- if regexMatch "^[a-zA-Z0-9+.-]+://[^/]*@" (toString $env.REDIS_URL) -}}
{{- fail "env.REDIS_URL carries credentials and would be stored in a ConfigMap: put the URL in a Secret and set redis.existingSecret (and redis.existingSecretKey)" -}}
{{- end -}}
{{- $shutdown := addf (float64 .Values.preStopSleepSeconds) (include "authz-sidecar.seconds" (default "5s" $env.SHUTDOWN_DRAIN_DELAY)) (include "authz-sidecar.seconds" (default "10s" $env.SHUTDOWN_TIMEOUT)) -}}
{{- if lt (float64 .Values.terminationGracePeriodSeconds) $shutdown -}}
{{- fail (printf "terminationGracePeriodSeconds (%v) must be at least preStopSleepSeconds + SHUTDOWN_DRAIN_DELAY + SHUTDOWN_TIMEOUT (%v s), or the kubelet kills Checks still in flight" .Values.terminationGracePeriodSeconds $shutdown) -}}
{{- end -}}
{{- if and .Values.tls.enabled (or $env.GRPC_TLS_CERT $env.GRPC_TLS_KEY $env.GRPC_TLS_CLIENT_CA) -}}
{{- fail "tls.enabled sets GRPC_TLS_CERT/KEY/CLIENT_CA itself: leave them empty in env" -}}
{{- end -}}
{{- if and (eq .Values.topology "sidecar") (include "authz-sidecar.tlsOn" .) -}}
{{- fail "topology sidecar: Envoy calls Check over a Unix socket in the pod, which is always plaintext; TLS applies to the gateway topology" -}}
{{- end -}}
{{- if and .Values.redis.tls.secretName (or $env.REDIS_TLS_CA $env.REDIS_TLS_CERT $env.REDIS_TLS_KEY) -}}
{{- fail "redis.tls.secretName sets REDIS_TLS_CA (and REDIS_TLS_CERT/KEY) itself: leave them empty in env" -}}
{{- end -}}
{{- if and .Values.redis.tls.secretName (not .Values.redis.existingSecret) (not (hasPrefix "rediss" (toString $env.REDIS_URL))) -}}
{{- fail "redis.tls.secretName needs a TLS REDIS_URL (rediss://, rediss-sentinel://, rediss-cluster://): the sidecar refuses TLS files beside a plaintext URL" -}}
{{- end -}}
{{- if and .Values.revocationFile.enabled $env.REVOCATION_FILE -}}
{{- fail "revocationFile.enabled sets REVOCATION_FILE itself: leave env.REVOCATION_FILE empty" -}}
{{- end -}}
{{- if and .Values.revocationFile.enabled (ne (toString $env.REVOCATION_BACKEND) "memory") -}}
{{- fail "revocationFile is read by the memory backend only: set env.REVOCATION_BACKEND=memory" -}}
{{- end -}}
{{- if and .Values.autoscaling.enabled .Values.autoscaling.keda.enabled -}}
{{- fail "autoscaling.enabled and autoscaling.keda.enabled: KEDA creates its own HPA; enable one of them" -}}
{{- end -}}
{{- if and .Values.istio.enabled (include "authz-sidecar.tlsOn" .) -}}
{{- fail "istio.enabled with TLS on the Check listener: Istio's ext_authz client speaks plaintext gRPC (the mesh's own mTLS protects it); turn tls off" -}}
{{- end -}}
{{- if and .Values.istio.enabled (eq .Values.topology "sidecar") -}}
{{- fail "istio.enabled calls the sidecar through a Service: use topology gateway" -}}
{{- end -}}
{{- if and .Values.istio.enabled (empty .Values.istio.selector) (or (not .Values.istio.policyNamespace) (eq .Values.istio.policyNamespace .Release.Namespace)) -}}
{{- fail "istio.selector is empty: the AuthorizationPolicy would cover this namespace, the sidecar's own pods included; select the workloads, or set istio.policyNamespace to another namespace (istio-system for mesh-wide)" -}}
{{- end -}}
{{- end -}}
