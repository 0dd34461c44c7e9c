{{/*
The helpers that add the agent to a pod spec. The chart's own Deployment uses them, and so can a
parent chart that lists this chart as a dependency (see README.md): pass a context that holds this
chart's values as .Values, plus .Release (and .Capabilities, for the native layout's Kubernetes
version check).

  prestop-agent.podSpec   (dict "pod" <your pod spec> "Values" <these values> "Release" .Release)
                          -> your pod spec with the agent, the app's preStop hook and readiness
                             probe, terminationGracePeriodSeconds and a RuntimeDefault seccomp
                             profile (unless the spec sets its own).
  prestop-agent.podLabels -> the labels the PodMonitor and the PodDisruptionBudget select on
                             (the release's own pods only: two releases in a namespace must not
                             scrape or budget each other's).
*/}}

{{- define "prestop-agent.fullname" -}}
{{- default .Release.Name .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Helm's label conventions: name is the chart's (not the release's, which fullnameOverride
could change under an immutable selector), instance the release's. */}}
{{- define "prestop-agent.name" -}}
{{- default "prestop-agent" .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "prestop-agent.selectorLabels" -}}
app.kubernetes.io/name: {{ include "prestop-agent.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "prestop-agent.labels" -}}
{{ include "prestop-agent.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end -}}

{{- define "prestop-agent.podLabels" -}}
prestop-agent/sidecar: "true"
prestop-agent/release: {{ .Release.Name }}
{{- end -}}

{{- define "prestop-agent.tokenSecretName" -}}
{{- if .Values.token.existingSecret.name -}}
{{- .Values.token.existingSecret.name -}}
{{- else -}}
{{- printf "%s-prestop-token" (include "prestop-agent.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* The ServiceAccount the pods run under and the Role is bound to: the release's own (created),
or the user's (serviceAccount.name); "" when neither (the pod spec's own, if any, stays). */}}
{{- define "prestop-agent.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (printf "%s-prestop-agent" (include "prestop-agent.fullname" .)) .Values.serviceAccount.name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "prestop-agent.rbacName" -}}
{{- printf "%s-prestop-agent" (include "prestop-agent.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Least privilege, in the pod's namespace: its own pod (the deletion's real grace period; no
resourceNames: a Deployment's pod names do not exist before its pods), the EndpointSlices that
list the pod (the Service path's propagation), Events on the pod (kubectl describe pod). */}}
{{- define "prestop-agent.rbacRules" -}}
- apiGroups: [""]
  resources: [pods]
  verbs: [get]
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [list, watch]
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create]
{{- end -}}

{{- define "prestop-agent.kubeApiDirectory" -}}/var/run/secrets/kubernetes.io/serviceaccount{{- end -}}

{{/* The agent's API credentials, as the ServiceAccount admission controller would mount them
(in-cluster clients read them at the well-known path), but into the agent container only: a token
the kubelet rotates (3607 s, what admission asks for too), the cluster's CA, the namespace. */}}
{{- define "prestop-agent.kubeApiVolume" -}}
name: prestop-agent-kube-api-access
projected:
  sources:
  - serviceAccountToken: {path: token, expirationSeconds: 3607}
  - configMap:
      name: kube-root-ca.crt
      items: [{key: ca.crt, path: ca.crt}]
  - downwardAPI:
      items: [{path: namespace, fieldRef: {apiVersion: v1, fieldPath: metadata.namespace}}]
{{- end -}}

{{/* The token's value, for the hook's header (Kubernetes cannot take a header from a Secret).
Never read from the cluster (no lookup): helm template and Argo CD must render what install does. */}}
{{- define "prestop-agent.token" -}}
{{- $token := .Values.token -}}
{{- if and $token.existingSecret.name (not $token.value) -}}
{{- fail "prestop-agent: token.existingSecret needs token.value too, with the same token: the hook's X-Prestop-Token header is a literal in the pod spec (Kubernetes cannot read it from a Secret) and the chart does not read the cluster (helm lookup is empty under helm template and Argo CD)" -}}
{{- end -}}
{{- $token.value -}}
{{- end -}}

{{/* The agent's environment: only the variables that apply to the chosen modes (the agent refuses
a drain setting of the other drain mode, rather than ignore it). */}}
{{- define "prestop-agent.env" -}}
{{- $v := .Values -}}
{{- $a := $v.agent -}}
{{- $d := $a.drain -}}
- {name: PRESTOP_PORT, value: {{ $v.port | quote }}}
{{- if not (kindIs "invalid" $a.host) }}
- {name: PRESTOP_HOST, value: {{ $a.host | quote }}}
{{- end }}
- {name: PRESTOP_GRACE_PERIOD_SECONDS, value: {{ $v.gracePeriodSeconds | quote }}}
- {name: PRESTOP_APP_SHUTDOWN_SECONDS, value: {{ $a.appShutdownSeconds | quote }}}
- {name: PRESTOP_MARGIN_SECONDS, value: {{ $a.marginSeconds | quote }}}
- {name: PRESTOP_APP_PORT, value: {{ $a.appPort | quote }}}
{{- with $a.appPorts }}
- {name: PRESTOP_APP_PORTS, value: {{ join "," . | quote }}}
{{- end }}
{{- with $a.appHealthPath }}
- {name: PRESTOP_APP_HEALTH_URL, value: {{ printf "http://127.0.0.1:%v%s" $a.appPort . | quote }}}
{{- end }}
- {name: PRESTOP_DRAIN_MODE, value: {{ $d.mode | quote }}}
{{- if eq $d.mode "fixed" }}
- {name: PRESTOP_DRAIN_SECONDS, value: {{ $d.seconds | quote }}}
{{- else }}{{/* traffic; values.schema.json allows no other mode */}}
- {name: PRESTOP_DRAIN_MIN_SECONDS, value: {{ $d.minSeconds | quote }}}
- {name: PRESTOP_DRAIN_QUIET_SECONDS, value: {{ $d.quietSeconds | quote }}}
{{- if not (kindIs "invalid" $d.maxSeconds) }}
- {name: PRESTOP_DRAIN_MAX_SECONDS, value: {{ $d.maxSeconds | quote }}}
{{- end }}
- {name: PRESTOP_DRAIN_POLL_SECONDS, value: {{ $d.pollSeconds | quote }}}
- {name: PRESTOP_DRAIN_SOURCE, value: {{ $d.source | quote }}}
{{- with $d.ignoreCidrs }}
- {name: PRESTOP_DRAIN_IGNORE_CIDRS, value: {{ join "," . | quote }}}
{{- end }}
- {name: PRESTOP_DRAIN_COUNT_ACCEPTS, value: {{ $a.countAccepts | quote }}}
{{- end }}
{{- if not (kindIs "invalid" $a.kubeProxySyncSeconds) }}
- {name: PRESTOP_KUBE_PROXY_SYNC_SECONDS, value: {{ $a.kubeProxySyncSeconds | quote }}}
{{- end }}
{{- with $a.allowCidrs }}
- {name: PRESTOP_ALLOW_CIDRS, value: {{ join "," . | quote }}}
{{- end }}
{{- if $v.token.value }}
- name: PRESTOP_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "prestop-agent.tokenSecretName" . }}
      key: {{ ternary "token" $v.token.existingSecret.key (empty $v.token.existingSecret.name) }}
{{- end }}
- {name: PRESTOP_LOG_FORMAT, value: {{ $a.logFormat | quote }}}
- {name: PRESTOP_LOG_LEVEL, value: {{ $a.logLevel | quote }}}
{{- $r := $v.registry }}
- {name: PRESTOP_REGISTRY, value: {{ $r.type | quote }}}
{{- if ne $r.type "none" }}
- {name: PRESTOP_REGISTRY_TIMEOUT_SECONDS, value: {{ $r.timeoutSeconds | quote }}}
- {name: PRESTOP_REGISTRY_CHECK_SECONDS, value: {{ $r.checkSeconds | quote }}}
{{- if not (kindIs "invalid" $r.eureka.clientRefreshSeconds) }}
- {name: PRESTOP_EUREKA_CLIENT_REFRESH_SECONDS, value: {{ $r.eureka.clientRefreshSeconds | quote }}}
{{- end }}
{{- if not (kindIs "invalid" $r.eureka.serverCacheSeconds) }}
- {name: PRESTOP_EUREKA_SERVER_CACHE_SECONDS, value: {{ $r.eureka.serverCacheSeconds | quote }}}
{{- end }}
{{- end }}
{{- if has $r.type (list "eureka" "register") }}
{{- $e := $r.eureka }}
- {name: PRESTOP_EUREKA_APP, value: {{ required "prestop-agent: registry.eureka.app is required" $e.app | quote }}}
- name: PRESTOP_EUREKA_URLS
  valueFrom:
    secretKeyRef:
      name: {{ required "prestop-agent: registry.eureka.urlsSecret.name is required" $e.urlsSecret.name }}
      key: {{ $e.urlsSecret.key }}
{{- with $e.instanceId }}
- {name: PRESTOP_EUREKA_INSTANCE_ID, value: {{ . | quote }}}
{{- end }}
- {name: PRESTOP_EUREKA_STATUS, value: {{ $e.status | quote }}}
- {name: PRESTOP_EUREKA_KEEP_OVERRIDE, value: {{ $e.keepOverride | quote }}}
{{- if include "prestop-agent.caSource" . }}
- {name: PRESTOP_EUREKA_CA_FILE, value: {{ printf "%s/%s" (include "prestop-agent.caDirectory" .) $e.ca.key | quote }}}
{{- else if $e.caFile }}
- {name: PRESTOP_EUREKA_CA_FILE, value: {{ $e.caFile | quote }}}
{{- end }}
{{- if eq $r.type "register" }}
- {name: PRESTOP_EUREKA_RENEWAL_SECONDS, value: {{ $e.renewalSeconds | quote }}}
- {name: PRESTOP_EUREKA_LEASE_SECONDS, value: {{ $e.leaseSeconds | quote }}}
{{- end }}
{{- else if eq $r.type "actuator" }}
{{- with $r.actuator.url }}
- {name: PRESTOP_ACTUATOR_URL, value: {{ . | quote }}}
{{- end }}
{{- end }}
- name: POD_NAME
  valueFrom: {fieldRef: {fieldPath: metadata.name}}
- name: POD_NAMESPACE
  valueFrom: {fieldRef: {fieldPath: metadata.namespace}}
- name: POD_IP
  valueFrom: {fieldRef: {fieldPath: status.podIP}}
{{- with $a.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* The private CA's volume source (a Secret or a ConfigMap), "" when none is configured. */}}
{{- define "prestop-agent.caSource" -}}
{{- $ca := .Values.registry.eureka.ca -}}
{{- if and $ca.secret $ca.configMap -}}
{{- fail "prestop-agent: set registry.eureka.ca.secret or registry.eureka.ca.configMap, not both" -}}
{{- else if $ca.secret -}}
{{- toYaml (dict "secret" (dict "secretName" $ca.secret)) -}}
{{- else if $ca.configMap -}}
{{- toYaml (dict "configMap" (dict "name" $ca.configMap)) -}}
{{- end -}}
{{- end -}}

{{- define "prestop-agent.caDirectory" -}}/etc/prestop-agent/eureka-ca{{- end -}}

{{- define "prestop-agent.container" -}}
{{- $v := .Values -}}
name: prestop-agent
image: {{ printf "%s:%s" $v.image.repository $v.image.tag | quote }}
imagePullPolicy: {{ $v.image.pullPolicy }}
{{- if eq $v.layout "native" }}
restartPolicy: Always
{{- end }}
ports:
- {name: prestop-agent, containerPort: {{ $v.port }}}
env:
{{ include "prestop-agent.env" . }}
livenessProbe:
  httpGet: {port: {{ $v.port }}, path: /live}
  periodSeconds: 10
# /live, not /ready: the agent's own readiness must not follow the drain (the app's does).
readinessProbe:
  httpGet: {port: {{ $v.port }}, path: /live}
  periodSeconds: 10
resources:
  {{- toYaml $v.resources | nindent 2 }}
securityContext:
  runAsNonRoot: true
  runAsUser: 10001
  runAsGroup: 10001
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities: {drop: [ALL]}
{{- $mounts := $v.agent.extraVolumeMounts }}
{{- if include "prestop-agent.caSource" . }}
{{- $mounts = append $mounts (dict "name" "prestop-agent-eureka-ca" "mountPath" (include "prestop-agent.caDirectory" .) "readOnly" true) }}
{{- end }}
{{- if $v.serviceAccount.mountToken }}
{{- $mounts = append $mounts (dict "name" "prestop-agent-kube-api-access" "mountPath" (include "prestop-agent.kubeApiDirectory" .) "readOnly" true) }}
{{- end }}
{{- with $mounts }}
volumeMounts:
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "prestop-agent.podSpec" -}}
{{- $v := .Values -}}
{{- if and (eq $v.layout "native") .Capabilities (not (semverCompare ">=1.29.0-0" .Capabilities.KubeVersion.Version)) -}}
{{- fail (printf "prestop-agent: layout native needs Kubernetes 1.29 or later (an init container with restartPolicy: Always), this cluster is %s: set layout=classic" .Capabilities.KubeVersion.Version) -}}
{{- end -}}
{{- $pod := deepCopy .pod -}}
{{- if hasKey $pod "terminationGracePeriodSeconds" -}}
{{- fail "prestop-agent: set gracePeriodSeconds, not the pod's terminationGracePeriodSeconds: the chart gives the same value to the pod and to the agent" -}}
{{- end -}}
{{- $_ := set $pod "terminationGracePeriodSeconds" (int $v.gracePeriodSeconds) -}}
{{- $account := include "prestop-agent.serviceAccountName" . -}}
{{- if $account -}}
{{- if and $pod.serviceAccountName (ne $pod.serviceAccountName $account) -}}
{{- fail (printf "prestop-agent: the pod spec runs as ServiceAccount %q, the chart's Role is bound to %q, and a pod has one ServiceAccount: set serviceAccount.create=false and serviceAccount.name=%s (the Role is then bound to yours)" $pod.serviceAccountName $account $pod.serviceAccountName) -}}
{{- end -}}
{{- $_ := set $pod "serviceAccountName" $account -}}
{{- end -}}
{{- $security := deepCopy (default (dict) $pod.securityContext) -}}
{{- if not (hasKey $security "seccompProfile") -}}
{{- $_ := set $security "seccompProfile" (dict "type" "RuntimeDefault") -}}
{{- end -}}
{{- $_ := set $pod "securityContext" $security -}}
{{- $hook := dict "path" "/prestop" "port" (int $v.port) -}}
{{- $token := include "prestop-agent.token" . -}}
{{- if $token -}}
{{- $_ := set $hook "httpHeaders" (list (dict "name" "X-Prestop-Token" "value" $token)) -}}
{{- end -}}
{{- $replaceProbe := $v.readinessProbe.replace -}}
{{- if and $replaceProbe (not $v.agent.appHealthPath) -}}
{{- fail "prestop-agent: agent.appHealthPath is empty, so the agent's /ready would not follow the app's health and the pod would go Ready before the app listens: set agent.appHealthPath (e.g. /actuator/health/readiness), or readinessProbe.replace=false to keep the app's own readiness probe" -}}
{{- end -}}
{{- $probe := omit (merge (dict "httpGet" (dict "path" "/ready" "port" (int $v.port))) (deepCopy $v.readinessProbe)) "replace" -}}
{{- $containers := list -}}
{{- $found := false -}}
{{- range $container := $pod.containers -}}
{{- $container = deepCopy $container -}}
{{- if eq $container.name $v.appContainer -}}
{{- $found = true -}}
{{- $lifecycle := default (dict) $container.lifecycle -}}
{{- if hasKey $lifecycle "preStop" -}}
{{- fail (printf "prestop-agent: container %q already has a preStop hook; the agent's /prestop replaces it (a sleep there only delays the drain)" $container.name) -}}
{{- end -}}
{{- $_ := set $lifecycle "preStop" (dict "httpGet" $hook) -}}
{{- $_ := set $container "lifecycle" $lifecycle -}}
{{- if $replaceProbe -}}
{{- $_ := set $container "readinessProbe" $probe -}}
{{- end -}}
{{- end -}}
{{- $containers = append $containers $container -}}
{{- end -}}
{{- if not $found -}}
{{- fail (printf "prestop-agent: the pod spec has no container named %q (set appContainer)" $v.appContainer) -}}
{{- end -}}
{{- $agent := include "prestop-agent.container" . | fromYaml -}}
{{- if eq $v.layout "native" -}}
{{- $_ := set $pod "initContainers" (prepend (default (list) $pod.initContainers) $agent) -}}
{{- else -}}
{{- $containers = append $containers $agent -}}
{{- end -}}
{{- $_ := set $pod "containers" $containers -}}
{{- with include "prestop-agent.caSource" . -}}
{{- $volume := merge (dict "name" "prestop-agent-eureka-ca") (fromYaml .) -}}
{{- $_ := set $pod "volumes" (append (default (list) $pod.volumes) $volume) -}}
{{- end -}}
{{- if $v.serviceAccount.mountToken -}}
{{- $_ := set $pod "volumes" (append (default (list) $pod.volumes) (include "prestop-agent.kubeApiVolume" . | fromYaml)) -}}
{{- end -}}
{{- toYaml $pod -}}
{{- end -}}
