package install

import (
	"strconv"
	"strings"
	"testing"

	"github.com/BurntSushi/toml"
	"github.com/obdproject/obd/internal/config"
)

func TestScanTOML(t *testing.T) {
	doc := `# comment
version = 2
a.b."c.d" = 'x' # dotted
s = """
[not.a.table]
x = 1
"""
lit = '''
[neither]'''
arr = [
  1, # one
  [2, 3],
  { k = "v", "q.k" = [ "}" ] },
]
date = 1979-05-27 07:32:00Z

[ t . "u.v" ]
  k = "\"]" # tricky
[[arr2]]
  n = 1
["\u0041"]
x = {a = 1}
`
	if _, err := toml.Decode(doc, new(map[string]any)); err != nil {
		t.Fatalf("test document is not TOML: %v", err)
	}
	items, err := scanTOML([]byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, it := range items {
		kind := "key"
		if it.header {
			kind = "table"
		}
		got = append(got, kind+" "+strings.Join(it.path, "|")+" @"+strconv.Itoa(it.line))
	}
	want := []string{
		"key version @2",
		"key a|b|c.d @3",
		"key s @4",
		"key lit @8",
		"key arr @10",
		"key date @15",
		"table t|u.v @17",
		"key t|u.v|k @18",
		"table arr2 @19",
		"key arr2|n @20",
		"table A @21",
		"key A|x @22",
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("items:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	if it := find(items, false, "t", "u.v", "k"); it == nil || doc[it.valStart:it.valEnd] != `"\"]"` {
		t.Errorf("value of t.\"u.v\".k not found exactly")
	}
	if l := locate(items, "t", "u.v", "missing"); l != 17 {
		t.Errorf("locate of a missing key in table t.\"u.v\" = %d, want 17", l)
	}
	if l := locate(items, "nothing"); l != 0 {
		t.Errorf("locate of nothing = %d", l)
	}
}

func TestQuote(t *testing.T) {
	for in, want := range map[string]string{
		`/run/obd/snapshotter.sock`: `"/run/obd/snapshotter.sock"`,
		`a"b\c`:                     `"a\"b\\c"`,
		"tab\there":                 `"tab\u0009here"`,
	} {
		if got := quoteBasic(in); got != want {
			t.Errorf("quoteBasic(%q) = %s, want %s", in, got, want)
		}
		var v struct{ K string }
		if _, err := toml.Decode("K = "+quoteBasic(in), &v); err != nil || v.K != in {
			t.Errorf("quoteBasic(%q) does not round-trip: %q %v", in, v.K, err)
		}
	}
	if got := tableName([]string{"plugins", "io.containerd.grpc.v1.cri", "containerd"}); got != `plugins."io.containerd.grpc.v1.cri".containerd` {
		t.Errorf("tableName = %s", got)
	}
}

// FuzzPlanContainerd: for any containerd config TOML can parse, install either refuses with an error or produces
// a file that starts with the user's bytes (or edits only the annotation value), parses, and registers the plugin.
func FuzzPlanContainerd(f *testing.F) {
	for _, s := range []string{debianConfig, userConfig, "", "version = 3\n", "[plugins.cri.containerd]\ndisable_snapshot_annotations = true",
		"proxy_plugins = { overlaybd = { type = \"snapshot\", address = \"/run/obd/snapshotter.sock\" } }\n",
		"[plugins.\"io.containerd.grpc.v1.cri\"]\ncontainerd.snapshotter = \"x\"\n"} {
		f.Add(s, false)
		f.Add(s, true)
	}
	f.Fuzz(func(t *testing.T, data string, cri bool) {
		if _, err := toml.Decode(data, new(map[string]any)); err != nil {
			return
		}
		p, err := planContainerd("config.toml", []byte(data), true, "/run/obd/snapshotter.sock", cri, 2)
		if err != nil {
			return
		}
		var doc map[string]any
		if _, err := toml.Decode(string(p.new), &doc); err != nil {
			t.Fatalf("result does not parse: %v\n%s", err, p.new)
		}
		if v, _ := config.Lookup(doc, "proxy_plugins", "overlaybd", "address"); v != "/run/obd/snapshotter.sock" {
			t.Fatalf("plugin not registered:\n%s", p.new)
		}
		if !cri && !strings.HasPrefix(string(p.new), data) {
			t.Fatalf("the user's bytes were not kept:\n%q\n%q", data, p.new)
		}
	})
}
