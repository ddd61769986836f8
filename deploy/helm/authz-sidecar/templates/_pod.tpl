{{/* The pod's volumes, as a YAML list (empty when there are none). */}}
{{- define "authz-sidecar.volumes" -}}
{{- $fullname := include "authz-sidecar.fullname" . -}}
{{- if eq .Values.topology "sidecar" }}
- name: check-socket
  emptyDir: { medium: Memory, sizeLimit: 1Mi }
- name: envoy-config
  configMap: { name: {{ $fullname }}-envoy }
{{- end }}
{{- if .Values.tls.enabled }}
- name: tls
  secret: { secretName: {{ include "authz-sidecar.tlsSecret" . }}, defaultMode: 0440 }
{{- if .Values.tls.clientCA.enabled }}
- name: client-ca
  secret:
    secretName: {{ default (include "authz-sidecar.tlsSecret" .) .Values.tls.clientCA.secretName }}
    defaultMode: 0440
    items: [{ key: {{ .Values.tls.clientCA.key }}, path: {{ .Values.tls.clientCA.key }} }]
{{- end }}
{{- end }}
{{- if .Values.revocationFile.enabled }}
- name: revocations
  configMap: { name: {{ $fullname }}-revocations }
{{- end }}
{{- if .Values.redis.tls.secretName }}
- name: redis-tls
  secret: { secretName: {{ .Values.redis.tls.secretName }}, defaultMode: 0440 }
{{- end }}
{{- with .Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* The authz-sidecar container: the pod's only container (gateway topology) or Envoy's native
sidecar (sidecar topology). */}}
{{- define "authz-sidecar.container" -}}
{{- $sidecar := eq .Values.topology "sidecar" -}}
{{- $tlsOn := include "authz-sidecar.tlsOn" . -}}
- name: authz-sidecar
  image: "{{ .Values.image.repository }}:{{ .Values.image.tag }}"
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  {{- if $sidecar }}
  restartPolicy: Always
  {{- end }}
  envFrom:
    - configMapRef:
        name: {{ include "authz-sidecar.fullname" . }}
  {{- $redisTls := .Values.redis.tls }}
  {{- if or .Values.redis.existingSecret $redisTls.secretName }}
  env:
    {{- if .Values.redis.existingSecret }}
    - name: REDIS_URL
      valueFrom:
        secretKeyRef: { name: {{ .Values.redis.existingSecret }}, key: {{ .Values.redis.existingSecretKey }} }
    {{- end }}
    {{- if $redisTls.secretName }}
    - { name: REDIS_TLS_CA, value: {{ printf "%s/%s" (include "authz-sidecar.redisTlsDir" .) $redisTls.caKey | quote }} }
    {{- if $redisTls.clientCertificate }}
    - { name: REDIS_TLS_CERT, value: {{ printf "%s/%s" (include "authz-sidecar.redisTlsDir" .) $redisTls.certKey | quote }} }
    - { name: REDIS_TLS_KEY, value: {{ printf "%s/%s" (include "authz-sidecar.redisTlsDir" .) $redisTls.keyKey | quote }} }
    {{- end }}
    {{- end }}
  {{- end }}
  ports:
    {{- if not $sidecar }}
    - { name: grpc, containerPort: {{ .Values.service.grpcPort }}, protocol: TCP }
    {{- end }}
    - { name: metrics, containerPort: {{ .Values.service.metricsPort }}, protocol: TCP }
    {{- if .Values.backchannelLogout.enabled }}
    - { name: logout, containerPort: {{ .Values.backchannelLogout.port }}, protocol: TCP }
    {{- end }}
  resources:
    {{- toYaml .Values.resources | nindent 4 }}
  # Startup: the process is up and serving HTTP. Not readiness: with Redis or the IdP down, a
  # new pod would otherwise be killed and restarted over and over instead of answering the
  # policy's fast 503s once keys load.
  startupProbe:
    httpGet: { path: /healthz, port: metrics }
    periodSeconds: 1
    failureThreshold: 30
  # Readiness: serving, keys loaded, not draining (NOT_SERVING from the first SIGTERM).
  readinessProbe:
    {{- if or $sidecar $tlsOn }}
    # {{ if $tlsOn }}The kubelet's gRPC probe cannot speak TLS{{ else }}Check listens on loopback and the socket only{{ end }}: the same readiness over HTTP.
    httpGet: { path: /readyz, port: metrics }
    {{- else }}
    grpc: { port: {{ .Values.service.grpcPort }}, service: envoy.service.auth.v3.Authorization }
    {{- end }}
    periodSeconds: 2
    failureThreshold: 2
  livenessProbe:
    httpGet: { path: /healthz, port: metrics }
    periodSeconds: 10
    failureThreshold: 3
  {{- if not $sidecar }}
  lifecycle:
    preStop:
      sleep: { seconds: {{ .Values.preStopSleepSeconds }} }
  {{- end }}
  {{- $mounts := include "authz-sidecar.volumeMounts" . }}
  {{- if $mounts }}
  volumeMounts:
    {{- $mounts | trim | nindent 4 }}
  {{- end }}
  securityContext:
    readOnlyRootFilesystem: true
    allowPrivilegeEscalation: false
    capabilities: { drop: [ALL] }
{{- end -}}

{{- define "authz-sidecar.volumeMounts" -}}
{{- if eq .Values.topology "sidecar" }}
- { name: check-socket, mountPath: {{ include "authz-sidecar.socketDir" . }} }
{{- end }}
{{- if .Values.tls.enabled }}
- { name: tls, mountPath: {{ include "authz-sidecar.tlsDir" . }}, readOnly: true }
{{- if .Values.tls.clientCA.enabled }}
- { name: client-ca, mountPath: {{ include "authz-sidecar.clientCADir" . }}, readOnly: true }
{{- end }}
{{- end }}
{{- if .Values.revocationFile.enabled }}
- { name: revocations, mountPath: {{ .Values.revocationFile.mountPath }}, readOnly: true }
{{- end }}
{{- if .Values.redis.tls.secretName }}
- { name: redis-tls, mountPath: {{ include "authz-sidecar.redisTlsDir" . }}, readOnly: true }
{{- end }}
{{- with .Values.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end -}}
