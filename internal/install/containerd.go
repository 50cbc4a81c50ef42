package install

import (
	"errors"
	"fmt"
	"reflect"
	"slices"
	"sort"
	"strings"

	"github.com/obdproject/obd/internal/config"

	"github.com/BurntSushi/toml"
)

// ProxyPluginName is the name containerd knows obd's snapshotter by: [proxy_plugins.overlaybd], and
// "--snapshotter overlaybd" for ctr/nerdctl, as with upstream's overlaybd-snapshotter.
const ProxyPluginName = "overlaybd"

// annotationsKey is the CRI setting that must be false for CRI pulls to pass image annotations to snapshotters.
const annotationsKey = "disable_snapshot_annotations"

// criLayout says where the CRI image settings live in one containerd config version.
type criLayout struct {
	ids   []string // plugin ids that, in disabled_plugins, turn CRI image pulls off
	table []string // table holding disable_snapshot_annotations and snapshotter
}

func criLayoutOf(version int) criLayout {
	switch version {
	case 1: // containerd 1.x without "version": short plugin names
		return criLayout{ids: []string{"cri"}, table: []string{"plugins", "cri", "containerd"}}
	case 2: // containerd 1.x
		return criLayout{ids: []string{"io.containerd.grpc.v1.cri", "cri"}, table: []string{"plugins", "io.containerd.grpc.v1.cri", "containerd"}}
	default: // 3: containerd 2.x split CRI into plugins; images hold the snapshotter settings
		return criLayout{ids: []string{"io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images"}, table: []string{"plugins", "io.containerd.cri.v1.images"}}
	}
}

// containerdPlan is what install does to containerd's config.
type containerdPlan struct {
	path    string
	exists  bool
	old     []byte
	new     []byte   // == old when nothing changes
	changes []string // what changed, for the user
	version int

	criEnabled        bool   // the CRI plugin is not disabled
	criTable          string // e.g. plugins."io.containerd.grpc.v1.cri".containerd
	annotationsPassed bool   // disable_snapshot_annotations is false after the plan
	addedPlugin       bool
}

// changed reports whether the plan writes the file.
func (p *containerdPlan) changed() bool { return !p.exists || string(p.old) != string(p.new) }

// manualEditError reports an edit install would not make safely and tells the user what to add by hand.
func manualEditError(path, why, snippet string) error {
	return fmt.Errorf("containerd config %s: %s; add this by hand and run obd install again:\n\n%s", path, why, snippet)
}

// planContainerd works out the edit of containerd's config (data, or none when !exists) that registers obd's
// snapshotter at address and, with cri, lets CRI pass image annotations. newVersion is the config version of a
// file created from scratch.
func planContainerd(path string, data []byte, exists bool, address string, cri bool, newVersion int) (*containerdPlan, error) {
	p := &containerdPlan{path: path, exists: exists, old: data}
	if !exists {
		data = fmt.Appendf(nil, "# containerd configuration, created by 'obd install'. containerd's defaults apply to everything not set\n# here: see 'containerd config default' and containerd-config.toml(5).\nversion = %d\n", newVersion)
	}
	doc := map[string]any{}
	if _, err := toml.Decode(string(data), &doc); err != nil {
		var pe toml.ParseError
		if errors.As(err, &pe) {
			return nil, fmt.Errorf("containerd config %s:%d: %s — fix the file (containerd cannot read it either); obd install changed nothing", path, pe.Position.Line, pe.Message)
		}
		return nil, fmt.Errorf("containerd config %s: %w", path, err)
	}
	items, err := scanTOML(data)
	if err != nil {
		return nil, fmt.Errorf("containerd config %s: cannot follow its layout to edit it (%v); add [proxy_plugins.%s] by hand: see docs/install.md", path, err, ProxyPluginName)
	}

	// version
	p.version = 1
	if v, ok := doc["version"]; ok {
		n, isInt := v.(int64)
		if !isInt || n < 1 || n > 3 {
			return nil, fmt.Errorf("containerd config %s:%d: version = %v: obd install knows versions 1, 2 (containerd 1.x) and 3 (containerd 2.x)", path, locate(items, "version"), v)
		}
		p.version = int(n)
	}

	var edits []edit
	var appended strings.Builder

	// [proxy_plugins.overlaybd]
	pluginPath := []string{"proxy_plugins", ProxyPluginName}
	wantSnippet := fmt.Sprintf("[proxy_plugins.%s]\n  type = \"snapshot\"\n  address = %s\n", ProxyPluginName, quoteBasic(address))
	switch pp, ok := doc["proxy_plugins"]; {
	case !ok:
		p.addedPlugin = true
	default:
		pm, isMap := pp.(map[string]any)
		if !isMap {
			return nil, fmt.Errorf("containerd config %s:%d: proxy_plugins is not a table", path, locate(items, "proxy_plugins"))
		}
		cur, ok := pm[ProxyPluginName]
		if !ok {
			p.addedPlugin = true
			break
		}
		m, isMap := cur.(map[string]any)
		if !isMap {
			return nil, fmt.Errorf("containerd config %s:%d: proxy_plugins.%s is not a table", path, locate(items, pluginPath...), ProxyPluginName)
		}
		if t, _ := m["type"].(string); t != "snapshot" {
			return nil, fmt.Errorf("containerd config %s:%d: [proxy_plugins.%s] has type = %q, but obd's snapshotter needs type = \"snapshot\": fix that line (or rename that plugin) and run obd install again",
				path, locate(items, append(pluginPath, "type")...), ProxyPluginName, m["type"])
		}
		if a, _ := m["address"].(string); a != address {
			return nil, fmt.Errorf("containerd config %s:%d: [proxy_plugins.%s] has address = %q, but obd-snapshotter listens on %q (snapshotter.address in obd.toml): make the two the same — edit that line or snapshotter.address — and run obd install again",
				path, locate(items, append(pluginPath, "address")...), ProxyPluginName, m["address"], address)
		}
	}
	if p.addedPlugin {
		appended.WriteString("\n# obd's snapshotter for lazily pulled overlaybd images (obd-snapshotter), added by 'obd install'.\n")
		appended.WriteString(wantSnippet)
		p.changes = append(p.changes, fmt.Sprintf("added [proxy_plugins.%s] (type \"snapshot\", address %s)", ProxyPluginName, quoteBasic(address)))
	}

	// CRI: disable_snapshot_annotations
	layout := criLayoutOf(p.version)
	p.criTable = tableName(layout.table)
	p.criEnabled = true
	if dp, ok := doc["disabled_plugins"].([]any); ok {
		for _, id := range dp {
			if s, _ := id.(string); slices.Contains(layout.ids, s) {
				p.criEnabled = false
			}
		}
	}
	// With cri: disable_snapshot_annotations = false and snapshotter = "overlaybd" in the CRI table.
	keyPath := append(slices.Clone(layout.table), annotationsKey)
	snPath := append(slices.Clone(layout.table), "snapshotter")
	cur, set := config.Lookup(doc, keyPath...)
	p.annotationsPassed = set && cur == false
	criSnippet := fmt.Sprintf("[%s]\n  %s = false\n  snapshotter = %q\n", p.criTable, annotationsKey, ProxyPluginName)
	if cri {
		criEdits, err := planCRIKeys(p, data, items, doc, layout.table, criSnippet)
		if err != nil {
			return nil, err
		}
		edits = append(edits, criEdits.edits...)
		if criEdits.table != "" {
			appended.WriteString("\n# Pull CRI (Kubernetes) images with obd's snapshotter and pass it image annotations, added by 'obd install --cri'.\n")
			appended.WriteString(criEdits.table)
		}
		p.annotationsPassed = true
	}

	// Apply: edits inside the file from the last to the first, then what is appended.
	out := slices.Clone(data)
	sort.Slice(edits, func(i, j int) bool { return edits[i].at > edits[j].at })
	for _, e := range edits {
		out = slices.Concat(out[:e.at:e.at], []byte(e.text), out[e.end:])
	}
	if appended.Len() > 0 {
		if len(out) > 0 && out[len(out)-1] != '\n' {
			out = append(out, '\n')
		}
		text := appended.String()
		if len(out) == 0 {
			text = strings.TrimPrefix(text, "\n")
		}
		out = append(out, text...)
	}
	p.new = out
	if !p.changed() {
		return p, nil
	}

	// Check the result with the real parser: it must hold what we wanted and everything it held before.
	snippet := ""
	if p.addedPlugin {
		snippet += wantSnippet
	}
	if cri {
		snippet += criSnippet
	}
	after := map[string]any{}
	if _, err := toml.Decode(string(out), &after); err != nil {
		return nil, manualEditError(path, fmt.Sprintf("the edited file would not parse (%v)", err), snippet)
	}
	if v, _ := config.Lookup(after, append(pluginPath, "address")...); v != address {
		return nil, manualEditError(path, "the edit did not register the plugin as expected", snippet)
	}
	if cri {
		if v, _ := config.Lookup(after, keyPath...); v != false {
			return nil, manualEditError(path, "the edit did not set "+annotationsKey+" as expected", snippet)
		}
		if v, _ := config.Lookup(after, snPath...); v != ProxyPluginName {
			return nil, manualEditError(path, "the edit did not set snapshotter as expected", snippet)
		}
	}
	before := doc
	if !exists {
		before = map[string]any{"version": int64(p.version)}
	}
	if !reflect.DeepEqual(strip(before, pluginPath, keyPath, snPath), strip(after, pluginPath, keyPath, snPath)) {
		return nil, manualEditError(path, "the edit would have changed other settings", snippet)
	}
	return p, nil
}

// criKeyEdits is how install --cri sets the CRI keys: edits inside the file, or a table to append.
type criKeyEdits struct {
	edits []edit
	table string
}

// planCRIKeys plans disable_snapshot_annotations = false and snapshotter = "overlaybd" in the CRI table: a value
// set otherwise is replaced in place (its comment kept), a missing key is added under the table's header, or the
// table is appended with both keys.
func planCRIKeys(p *containerdPlan, data []byte, items []tomlItem, doc map[string]any, table []string, snippet string) (criKeyEdits, error) {
	var out criKeyEdits
	keys := []struct {
		key, text, why string
		want           any
		literal        func(string) bool // the forms of a current value install replaces
	}{
		{annotationsKey, "false", "pass image annotations to snapshotters", false, func(v string) bool { return v == "true" }},
		{"snapshotter", quoteBasic(ProxyPluginName), "pull CRI images with obd's snapshotter", ProxyPluginName, isSimpleString},
	}
	hdr := find(items, true, table...)
	var underHeader strings.Builder
	var missing []string
	for _, k := range keys {
		keyPath := append(slices.Clone(table), k.key)
		cur, set := config.Lookup(doc, keyPath...)
		if set && cur == k.want {
			continue
		}
		if set && reflect.TypeOf(cur) != reflect.TypeOf(k.want) {
			return out, fmt.Errorf("containerd config %s:%d: %s.%s = %v is not a %T", p.path, locate(items, keyPath...), p.criTable, k.key, cur, k.want)
		}
		switch it := find(items, false, keyPath...); {
		case it != nil:
			if !k.literal(strings.TrimSpace(string(data[it.valStart:it.valEnd]))) {
				return out, manualEditError(p.path, fmt.Sprintf("line %d sets %s in a form obd install does not edit", it.line, k.key), snippet)
			}
			out.edits = append(out.edits, edit{at: it.valStart, end: it.valEnd, text: k.text})
			p.changes = append(p.changes, fmt.Sprintf("set %s = %s in [%s] (line %d)", k.key, k.text, p.criTable, it.line))
		case hdr != nil:
			fmt.Fprintf(&underHeader, "%s  %s = %s # added by 'obd install': %s\n", hdr.indent, k.key, k.text, k.why)
			p.changes = append(p.changes, fmt.Sprintf("set %s = %s in [%s] (after line %d)", k.key, k.text, p.criTable, hdr.line))
		default:
			missing = append(missing, k.key+" = "+k.text)
		}
	}
	if underHeader.Len() > 0 {
		lines, at := underHeader.String(), hdr.end
		if at == len(data) && (at == 0 || data[at-1] != '\n') {
			lines = "\n" + lines
		}
		out.edits = append(out.edits, edit{at: at, end: at, text: lines})
	}
	if len(missing) > 0 {
		out.table = fmt.Sprintf("[%s]\n  %s\n", p.criTable, strings.Join(missing, "\n  "))
		p.changes = append(p.changes, fmt.Sprintf("added [%s] with %s", p.criTable, strings.Join(missing, ", ")))
	}
	return out, nil
}

// isSimpleString reports whether a TOML value is a one-line basic or literal string without escapes.
func isSimpleString(v string) bool {
	if len(v) < 2 || strings.ContainsAny(v, "\\\n") {
		return false
	}
	q := v[0]
	return (q == '"' || q == '\'') && v[len(v)-1] == q && !strings.ContainsRune(v[1:len(v)-1], rune(q))
}

// edit replaces data[at:end] with text.
type edit struct {
	at, end int
	text    string
}

// strip returns a deep copy of doc without the keys at paths and without tables left empty by that.
func strip(doc map[string]any, paths ...[]string) map[string]any {
	cp := deepCopy(doc).(map[string]any)
	for _, p := range paths {
		remove(cp, p)
	}
	return cp
}

// remove deletes path from m and prunes the tables it leaves empty.
func remove(m map[string]any, path []string) {
	if len(path) == 0 {
		return
	}
	if len(path) == 1 {
		delete(m, path[0])
		return
	}
	sub, ok := m[path[0]].(map[string]any)
	if !ok {
		return
	}
	remove(sub, path[1:])
	if len(sub) == 0 {
		delete(m, path[0])
	}
}

func deepCopy(v any) any {
	switch t := v.(type) {
	case map[string]any:
		m := make(map[string]any, len(t))
		for k, x := range t {
			m[k] = deepCopy(x)
		}
		return m
	case []map[string]any:
		s := make([]map[string]any, len(t))
		for i, x := range t {
			s[i] = deepCopy(x).(map[string]any)
		}
		return s
	case []any:
		s := make([]any, len(t))
		for i, x := range t {
			s[i] = deepCopy(x)
		}
		return s
	}
	return v
}
