package keylock

import (
	"sync"
	"testing"
	"time"
)

func TestLocks(t *testing.T) {
	var l Locks
	unlockA := l.Lock("a")
	// Another key is not held up by a.
	done := make(chan struct{})
	go func() {
		l.Lock("b")()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("key b waited for key a")
	}
	// The same key waits until it is unlocked.
	var got sync.WaitGroup
	locked := make(chan struct{})
	got.Go(func() {
		unlock := l.Lock("a")
		close(locked)
		unlock()
	})
	select {
	case <-locked:
		t.Fatal("key a locked twice")
	case <-time.After(50 * time.Millisecond):
	}
	unlockA()
	got.Wait()
	if len(l.m) != 0 {
		t.Fatalf("%d locks kept after every key was unlocked", len(l.m))
	}
}
