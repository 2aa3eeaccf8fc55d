#!/bin/sh
# Runs the containers' health checks, for Podman on a host without systemd: Podman schedules them with systemd timers
# only, so there a container with a health check stays "starting" for ever, and docker-compose, which waits for
# `condition: service_healthy`, never starts what depends on it. Every INTERVAL seconds (default 2), each running
# container of the engine that has a health check is checked once (`podman healthcheck run`), as the timer would.
#
# Usage: deploy/podman/healthchecks.sh [INTERVAL]      runs until stopped (in the background: `... &`, then `kill %1`)
#        deploy/podman/healthchecks.sh --once          one round, then exits
set -u

interval=${1:-2}
while :; do
    for id in $(podman ps -q --filter health=starting --filter health=healthy --filter health=unhealthy); do
        podman healthcheck run "$id" >/dev/null 2>&1
    done
    [ "$interval" = "--once" ] && exit 0
    sleep "$interval"
done
