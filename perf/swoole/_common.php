<?php
// Shared helpers for the Swoole side of the benchmarks (see README.md). Public Swoole API only.

declare(strict_types=1);

if (!extension_loaded('swoole')) {
    fwrite(STDERR, "the swoole extension is not loaded (check with: php --ri swoole)\n");
    exit(2);
}

const BENCH_SYSTEM = 'swoole';
const BENCH_WORKERS = 2;
const BENCH_TASK_WORKERS = 2;

/** Parses "--name value" / "--flag" options over the defaults given; unknown options are an error. */
function bench_opts(array $defaults): array
{
    $argv = $_SERVER['argv'];
    $opts = $defaults;
    for ($i = 1; $i < count($argv); $i++) {
        $arg = $argv[$i];
        if (!str_starts_with($arg, '--')) {
            fwrite(STDERR, "unexpected argument: $arg\n");
            exit(2);
        }
        $name = substr($arg, 2);
        $value = null;
        if (str_contains($name, '=')) {
            [$name, $value] = explode('=', $name, 2);
        }
        if (!array_key_exists($name, $defaults)) {
            fwrite(STDERR, "unknown option --$name (known: --" . implode(', --', array_keys($defaults)) . ")\n");
            exit(2);
        }
        if (is_bool($defaults[$name])) {
            $opts[$name] = $value === null ? true : filter_var($value, FILTER_VALIDATE_BOOLEAN);
            continue;
        }
        if ($value === null) {
            $value = $argv[++$i] ?? null;
            if ($value === null) {
                fwrite(STDERR, "--$name needs a value\n");
                exit(2);
            }
        }
        $opts[$name] = is_int($defaults[$name]) || $defaults[$name] === null ? intval($value, 0) : $value;
    }
    return $opts;
}

/**
 * The task data: [1, <string>, 3.5], like pyswtask's params [1, 'abc', 3.5], with the string
 * padded so that the serialized task data is $bytes long (103 by default, the size of the
 * default task in the pyswtask benchmarks). Swoole serializes non-string task data with
 * PHP's serialize(); the smallest possible is 38 bytes.
 */
function bench_task_data(int $bytes): array
{
    // Start a few bytes short of the size (35 bytes of framing for an empty string, plus the
    // length's digits) so that a 1 MiB payload does not take a million serialize() calls.
    $len = max(0, $bytes - 45);
    while (strlen(serialize([1, str_repeat('x', $len), 3.5])) < $bytes) {
        $len++;
    }
    return [1, str_repeat('x', $len), 3.5];
}

function bench_emit(string $workload, ?float $value, string $unit, array $extras = []): void
{
    $row = ['workload' => $workload, 'system' => BENCH_SYSTEM, 'value' => $value, 'unit' => $unit] + $extras
         + ['swoole' => SWOOLE_VERSION, 'php' => PHP_VERSION];
    fwrite(STDOUT, json_encode($row, JSON_UNESCAPED_SLASHES | JSON_PRESERVE_ZERO_FRACTION) . "\n");
    fflush(STDOUT);
}

/** Latency summary in microseconds from samples in nanoseconds. */
function bench_latency(array $samples_ns): array
{
    sort($samples_ns);
    $n = count($samples_ns);
    return [
        'p50' => round($samples_ns[intdiv($n, 2)] / 1e3, 3),
        'p99' => round($samples_ns[(int)($n * 0.99)] / 1e3, 3),
        'mean' => round(array_sum($samples_ns) / $n / 1e3, 3),
    ];
}

/** Common settings: 2 workers + 2 task workers, logs on stderr so stdout carries only JSON lines. */
function bench_settings(array $extra = []): array
{
    return $extra + [
        'worker_num' => BENCH_WORKERS,
        'task_worker_num' => BENCH_TASK_WORKERS,
        'enable_coroutine' => false,
        'log_file' => '/dev/stderr',
        'log_level' => SWOOLE_LOG_WARNING,
        'max_wait_time' => 5,
    ];
}

/** A Swoole server on loopback, on a port the kernel picks (nothing connects to it). */
function bench_server(): Swoole\Server
{
    return new Swoole\Server('127.0.0.1', 0, SWOOLE_BASE, SWOOLE_SOCK_TCP);
}

/** Set by the watchdog: bench_start() then exits with status 1. */
$BENCH_WATCHDOG_FIRED = new Swoole\Atomic(0);

/**
 * A user process that shuts the server down after $seconds if it is still running, printing an
 * error line for each workload (name => unit) that did not report. $reported counts the lines
 * printed so far.
 */
function bench_watchdog(Swoole\Server $server, int $seconds, array $workloads, Swoole\Atomic $reported): void
{
    global $BENCH_WATCHDOG_FIRED;
    $fired = $BENCH_WATCHDOG_FIRED;
    $server->addProcess(new Swoole\Process(function () use ($server, $seconds, $workloads, $reported, $fired) {
        $deadline = microtime(true) + $seconds;
        while (microtime(true) < $deadline) {
            usleep(200_000);
            if ($reported->get() >= count($workloads)) {
                // Done: wait here for the shutdown (a user process that returns is restarted).
                while (true) {
                    sleep(60);
                }
            }
        }
        $fired->set(1);
        foreach (array_slice($workloads, $reported->get(), null, true) as $workload => $unit) {
            bench_emit($workload, null, $unit, ['error' => "watchdog: no result within {$seconds} s"]);
        }
        $server->shutdown();
        while (true) {
            sleep(60);
        }
    }, false, 0, false));
}

/** Starts the server; returns when it has shut down, exiting 1 if the watchdog stopped it. */
function bench_start(Swoole\Server $server): void
{
    global $BENCH_WATCHDOG_FIRED;
    $server->start();
    exit($BENCH_WATCHDOG_FIRED->get() ? 1 : 0);
}
