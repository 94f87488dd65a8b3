#!/usr/bin/env bash
# Frozen node: SIGSTOP every process of n2 (a suspended VM). Its heartbeats stop, its TCP connection stays
# open: only the registrar's TTL can notice. It is suspect, its frozen wireguard-go answers no probe, and it is
# unreachable vouch_wait_s later. Thawed, it resumes heartbeating and is active again, same IP.
source "$(dirname "$0")/lib.sh"
step up --nodes 4
step wait
step status
say "freeze n2"
step freeze n2
step wait --timeout 30
step status
step ping
say "thaw n2"
step thaw n2
step wait --timeout 30
step status
step ping --tcp
say "registrar decisions and agent tunnel changes (service timestamps, UTC):"
events
