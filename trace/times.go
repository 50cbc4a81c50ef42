package trace

import (
	"encoding/json"
	"fmt"
	"time"
)

// TimesSuffix names obd's companion of a recorded trace file: PATH.times.json beside PATH. Upstream neither writes
// nor reads it; a trace without it replays the same.
const TimesSuffix = ".times.json"

// Times says when a recording started and when each of its records was first read.
type Times struct {
	// Started is when the recording began: the image's device was attached.
	Started time.Time `json:"started"`
	// AtMicros holds, for each record of the trace in its order, microseconds from Started to its first read.
	AtMicros []int64 `json:"at_us"`
	// Dropped counts reads left out beyond MaxRecords.
	Dropped int64 `json:"dropped,omitempty"`
}

// NewTimes returns the Times of what a Recorder recorded.
func NewTimes(started time.Time, at []time.Duration, dropped int64) Times {
	t := Times{Started: started, AtMicros: make([]int64, len(at)), Dropped: dropped}
	for i, d := range at {
		t.AtMicros[i] = d.Microseconds()
	}
	return t
}

// DecodeTimes parses a PATH.times.json file of a trace with records records.
func DecodeTimes(b []byte, records int) (Times, error) {
	var t Times
	if err := json.Unmarshal(b, &t); err != nil {
		return Times{}, fmt.Errorf("trace times: %w", err)
	}
	if len(t.AtMicros) != records {
		return Times{}, fmt.Errorf("trace times: %d times for %d records", len(t.AtMicros), records)
	}
	for i, us := range t.AtMicros {
		if us < 0 || (i > 0 && us < t.AtMicros[i-1]) {
			return Times{}, fmt.Errorf("trace times: time %d (%d µs) is negative or earlier than the one before", i, us)
		}
	}
	if t.Dropped < 0 {
		return Times{}, fmt.Errorf("trace times: negative dropped count %d", t.Dropped)
	}
	return t, nil
}
