package install

import (
	"flag"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"strings"
	"testing"

	"github.com/BurntSushi/toml"

	"github.com/obdproject/obd/internal/config"
	"github.com/obdproject/obd/internal/registry"
)

var update = flag.Bool("update", false, "rewrite deploy/obd.toml and deploy/obd-snapshotter.service from this package")

// deployDir is the repository's deploy/ directory.
var deployDir = filepath.Join("..", "..", "deploy")

// TestDeployFiles keeps deploy/ equal to what install writes: deploy/obd.toml is the embedded default config and
// deploy/obd-snapshotter.service the unit for a binary in /usr/local/bin. 'go test -run TestDeployFiles -update'
// rewrites them.
func TestDeployFiles(t *testing.T) {
	files := map[string][]byte{
		"obd.toml":                DefaultConfig,
		"obd-snapshotter.service": Unit("/usr/local/bin/obd-snapshotter", config.DefaultPath),
	}
	for name, want := range files {
		path := filepath.Join(deployDir, name)
		if *update {
			if err := os.WriteFile(path, want, 0o644); err != nil {
				t.Fatal(err)
			}
			continue
		}
		got, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		if string(got) != string(want) {
			t.Errorf("%s differs from what obd install writes: run 'go test ./internal/install -run TestDeployFiles -update'", path)
		}
	}
}

// settingRE matches a commented-out setting of the default config: "# key = value".
var settingRE = regexp.MustCompile(`(?m)^# ([a-z_]+ = .*)$`)

// TestDefaultConfigMatchesDaemon checks the default obd.toml against the daemon's defaults: with every setting
// uncommented it decodes to config.Default(), every key of config.Config is in it and nothing else is.
func TestDefaultConfigMatchesDaemon(t *testing.T) {
	uncommented := settingRE.ReplaceAllString(string(DefaultConfig), "$1")
	var got config.Config
	md, err := toml.Decode(uncommented, &got)
	if err != nil {
		t.Fatalf("uncommented default config does not parse: %v\n%s", err, uncommented)
	}
	if u := md.Undecoded(); len(u) > 0 {
		t.Errorf("the default config has keys the daemon does not know: %v", u)
	}
	for _, key := range tomlKeys(reflect.TypeOf(config.Config{}), nil) {
		if !md.IsDefined(key...) {
			t.Errorf("the default config (internal/install/obd.toml) does not document %s: add it with its default value, commented out", strings.Join(key, "."))
		}
	}
	want := config.Default()
	normalize(reflect.ValueOf(&got).Elem())
	normalize(reflect.ValueOf(&want).Elem())
	if !reflect.DeepEqual(got, want) {
		t.Errorf("the default config's values differ from the daemon's defaults:\n got %+v\nwant %+v", got, want)
	}

	// As written (all commented out) it is valid and means the defaults.
	path := filepath.Join(t.TempDir(), "obd.toml")
	if err := os.WriteFile(path, DefaultConfig, 0o644); err != nil {
		t.Fatal(err)
	}
	cfg, warnings, err := config.Load(path, true)
	if err != nil || len(warnings) > 0 {
		t.Fatalf("config.Load of the default config: %v %v", err, warnings)
	}
	normalize(reflect.ValueOf(&cfg).Elem())
	if !reflect.DeepEqual(cfg, want) {
		t.Errorf("the default config as written is not the defaults")
	}
	if config.DefaultCredentialHelpers != registry.DefaultHelperFile {
		t.Errorf("config.DefaultCredentialHelpers %q != registry.DefaultHelperFile %q", config.DefaultCredentialHelpers, registry.DefaultHelperFile)
	}
}

// tomlKeys lists the keys (table, key) of a config struct type.
func tomlKeys(t reflect.Type, prefix []string) [][]string {
	var keys [][]string
	for i := range t.NumField() {
		f := t.Field(i)
		name, _, _ := strings.Cut(f.Tag.Get("toml"), ",")
		if name == "" || name == "-" {
			continue
		}
		key := append(append([]string(nil), prefix...), name)
		if f.Type.Kind() == reflect.Struct {
			keys = append(keys, tomlKeys(f.Type, key)...)
			continue
		}
		keys = append(keys, key)
	}
	return keys
}

// normalize turns empty slices into nil ones, so "x = []" equals an unset list.
func normalize(v reflect.Value) {
	switch v.Kind() {
	case reflect.Struct:
		for i := range v.NumField() {
			normalize(v.Field(i))
		}
	case reflect.Slice:
		if v.Len() == 0 && v.CanSet() {
			v.Set(reflect.Zero(v.Type()))
		}
	}
}
