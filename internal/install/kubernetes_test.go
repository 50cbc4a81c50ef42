package install

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/obdproject/obd/internal/config"
	"github.com/obdproject/obd/internal/testenv"
)

// fakeAPIServer answers the discovery requests kubectl makes before a client-side dry run: the core group with
// configmaps and apps/v1 with daemonsets; every object is missing, so apply would create it. There is no OpenAPI
// document offline: the manifests' fields are checked below instead.
func fakeAPIServer(t *testing.T) string {
	resources := func(gv string, kinds ...[3]string) string {
		var rs []map[string]any
		for _, k := range kinds {
			rs = append(rs, map[string]any{"name": k[0], "singularName": k[1], "namespaced": true, "kind": k[2],
				"verbs": []string{"create", "get", "list", "patch", "update", "delete"}})
		}
		b, _ := json.Marshal(map[string]any{"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": rs})
		return string(b)
	}
	answers := map[string]string{
		"/api":          `{"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]}`,
		"/apis":         `{"kind": "APIGroupList", "apiVersion": "v1", "groups": [{"name": "apps", "versions": [{"groupVersion": "apps/v1", "version": "v1"}], "preferredVersion": {"groupVersion": "apps/v1", "version": "v1"}}]}`,
		"/api/v1":       resources("v1", [3]string{"configmaps", "configmap", "ConfigMap"}),
		"/apis/apps/v1": resources("apps/v1", [3]string{"daemonsets", "daemonset", "DaemonSet"}),
	}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		if a, ok := answers[r.URL.Path]; ok && r.Method == http.MethodGet {
			w.Write([]byte(a))
			return
		}
		w.WriteHeader(http.StatusNotFound)
		w.Write([]byte(`{"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404}`))
	}))
	t.Cleanup(srv.Close)
	return srv.URL
}

// TestKubernetesManifests validates deploy/kubernetes with kubectl apply --dry-run=client and checks what the
// node needs: the ConfigMap's obd.toml is valid for the daemon (no unknown key), the DaemonSet is privileged,
// mounts every volume it names, shares its mounts with the host, probes with obd health and is scraped by
// Prometheus on the metrics address of its obd.toml.
func TestKubernetesManifests(t *testing.T) {
	kubectl := testenv.Tools(t, "kubectl")[0]
	dir := filepath.Join(deployDir, "kubernetes")
	cmd := exec.Command(kubectl, "--server", fakeAPIServer(t), "apply", "--dry-run=client", "--validate=false", "-o", "json", "-f", dir)
	cmd.Env = append(os.Environ(), "KUBECONFIG="+filepath.Join(t.TempDir(), "none"))
	out, err := cmd.Output()
	if err != nil {
		var stderr []byte
		if ee, ok := err.(*exec.ExitError); ok {
			stderr = ee.Stderr
		}
		t.Fatalf("kubectl apply --dry-run=client -f %s: %v\n%s", dir, err, stderr)
	}
	var list struct {
		Items []json.RawMessage `json:"items"`
	}
	if err := json.Unmarshal(out, &list); err != nil || len(list.Items) != 2 {
		t.Fatalf("kubectl printed %d objects (%v), want the ConfigMap and the DaemonSet:\n%s", len(list.Items), err, out)
	}
	var cm struct {
		Kind string            `json:"kind"`
		Data map[string]string `json:"data"`
	}
	var ds struct {
		Kind string `json:"kind"`
		Spec struct {
			Template struct {
				Metadata struct {
					Annotations map[string]string `json:"annotations"`
				} `json:"metadata"`
				Spec struct {
					HostNetwork bool `json:"hostNetwork"`
					Containers  []struct {
						Command         []string `json:"command"`
						SecurityContext struct {
							Privileged bool `json:"privileged"`
						} `json:"securityContext"`
						ReadinessProbe, LivenessProbe struct {
							Exec struct {
								Command []string `json:"command"`
							} `json:"exec"`
						}
						VolumeMounts []struct {
							Name             string `json:"name"`
							MountPath        string `json:"mountPath"`
							MountPropagation string `json:"mountPropagation"`
						} `json:"volumeMounts"`
					} `json:"containers"`
					Volumes []struct {
						Name      string    `json:"name"`
						ConfigMap *struct{} `json:"configMap"`
						HostPath  *struct {
							Path string `json:"path"`
						} `json:"hostPath"`
					} `json:"volumes"`
				} `json:"spec"`
			} `json:"template"`
		} `json:"spec"`
	}
	for _, raw := range list.Items {
		var k struct{ Kind string }
		json.Unmarshal(raw, &k)
		switch k.Kind {
		case "ConfigMap":
			json.Unmarshal(raw, &cm)
		case "DaemonSet":
			json.Unmarshal(raw, &ds)
		}
	}
	if cm.Kind == "" || ds.Kind == "" {
		t.Fatalf("want a ConfigMap and a DaemonSet:\n%s", out)
	}

	// The ConfigMap's obd.toml, as the daemon loads it.
	path := filepath.Join(t.TempDir(), "obd.toml")
	if err := os.WriteFile(path, []byte(cm.Data["obd.toml"]), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg, warnings, err := config.Load(path, true)
	if err != nil || len(warnings) > 0 {
		t.Fatalf("the ConfigMap's obd.toml: %v %v", err, warnings)
	}

	pod := ds.Spec.Template.Spec
	if len(pod.Containers) != 1 {
		t.Fatalf("%d containers, want obd-snapshotter", len(pod.Containers))
	}
	c := pod.Containers[0]
	if !c.SecurityContext.Privileged || !pod.HostNetwork {
		t.Error("the daemon must run privileged (FUSE, loop devices, mounts) on the host's network (metrics, sockets)")
	}
	if strings.Join(c.Command, " ") != "/usr/local/bin/obd-snapshotter --config /etc/obd/obd.toml" {
		t.Errorf("command %q", c.Command)
	}
	for name, p := range map[string][]string{"readiness": c.ReadinessProbe.Exec.Command, "liveness": c.LivenessProbe.Exec.Command} {
		if len(p) < 2 || p[1] != "health" || !strings.Contains(strings.Join(p, " "), "--config /etc/obd/obd.toml") {
			t.Errorf("%s probe %q: want obd health with the ConfigMap's obd.toml", name, p)
		}
	}
	a := ds.Spec.Template.Metadata.Annotations
	if a["prometheus.io/scrape"] != "true" || a["prometheus.io/path"] != "/metrics" || !strings.HasSuffix(cfg.Metrics.Address, ":"+a["prometheus.io/port"]) ||
		strings.HasPrefix(cfg.Metrics.Address, "127.") {
		t.Errorf("scrape annotations %v with [metrics] address %q: want Prometheus to reach the metrics", a, cfg.Metrics.Address)
	}
	volumes := map[string]bool{}
	for _, v := range pod.Volumes {
		volumes[v.Name] = v.HostPath != nil || v.ConfigMap != nil
	}
	mounted := map[string]string{} // mount path → propagation
	for _, m := range c.VolumeMounts {
		if !volumes[m.Name] {
			t.Errorf("volume mount %s names no hostPath or ConfigMap volume", m.Name)
		}
		mounted[m.MountPath] = m.MountPropagation
	}
	// The daemon's files must be on host paths: sockets for containerd and kubelet, state with its mounts.
	under := func(p string) (string, bool) {
		for mp := range mounted {
			if p == mp || strings.HasPrefix(p, mp+"/") {
				return mp, true
			}
		}
		return "", false
	}
	for key, p := range map[string]string{
		"snapshotter.address": cfg.Snapshotter.Address, "snapshotter.root": cfg.Snapshotter.Root, "cache.dir": cfg.Cache.Dir,
		"cri.address": cfg.CRI.Address, "cri.containerd_address": cfg.CRI.ContainerdAddress, "registry.docker_config": cfg.Registry.DockerConfig,
	} {
		if _, ok := under(p); !ok {
			t.Errorf("%s = %s is on no volume", key, p)
		}
	}
	if mp, _ := under(cfg.Snapshotter.Root); mounted[mp] != "Bidirectional" {
		t.Errorf("snapshotter.root %s: its volume %s must have mountPropagation Bidirectional, so that containerd sees the image mounts", cfg.Snapshotter.Root, mp)
	}
	if _, ok := mounted["/dev"]; !ok {
		t.Error("/dev is not mounted: the daemon needs /dev/fuse and the loop devices")
	}
}
