<?php
// batch_co_100: batches of 100 tasks waited on together, repeated, from worker 0; the task
// workers echo their input. Two results, tasks/s:
//   batch_co_100      $server->taskWaitMulti($batch, 5.0) outside any coroutine (blocking)
//   batch_taskco_100  $server->taskCo($batch, 5.0) inside a coroutine
// Each is preceded by 20 untimed batches.
//
//     php perf/swoole/batch_co_100.php [--batches 1000] [--size 100] [--payload 103]

declare(strict_types=1);
require __DIR__ . '/_common.php';

$o = bench_opts(['batches' => 1000, 'size' => 100, 'payload' => 103, 'warmup' => 20, 'timeout' => 120]);
$data = bench_task_data($o['payload']);
$reported = new Swoole\Atomic(0);

$server = bench_server();
$server->set(bench_settings());
$server->on('receive', function () {});
$server->on('task', function (Swoole\Server $server, int $taskId, int $srcWorkerId, mixed $data) {
    return $data;
});
$server->on('finish', function () {});

/** Runs the batches with $call and returns [tasks/s, extras]. */
function run_batches(callable $call, array $batch, array $o): array
{
    for ($i = 0; $i < $o['warmup']; $i++) {
        $call($batch);
    }
    $ok = true;
    $t0 = hrtime(true);
    for ($i = 0; $i < $o['batches']; $i++) {
        $out = $call($batch);
        $ok = $ok && count($out) === count($batch) && $out[0] === $batch[0];
    }
    $elapsed = (hrtime(true) - $t0) / 1e9;
    $n = $o['batches'] * count($batch);
    return [round($n / $elapsed, 3), [
        'n' => $n, 'batches' => $o['batches'], 'batch' => count($batch),
        'payload' => strlen(serialize($batch[0])), 'elapsed_s' => round($elapsed, 4), 'ok' => $ok,
    ]];
}

$server->on('workerStart', function (Swoole\Server $server, int $wid) use ($data, $o, $reported) {
    if ($server->taskworker || $wid !== 0) {
        return;
    }
    Swoole\Timer::after(300, function () use ($server, $data, $o, $reported) {
        $batch = array_fill(0, $o['size'], $data);
        $name = "_{$o['size']}";

        // Blocking taskWaitMulti (this timer callback runs outside any coroutine).
        [$value, $extras] = run_batches(fn($b) => $server->taskWaitMulti($b, 5.0), $batch, $o);
        bench_emit("batch_co$name", $value, 'tasks/s', $extras);
        $reported->add(1);

        go(function () use ($server, $batch, $o, $reported, $name) {
            [$value, $extras] = run_batches(fn($b) => $server->taskCo($b, 5.0), $batch, $o);
            bench_emit("batch_taskco$name", $value, 'tasks/s', $extras);
            $reported->add(1);
            $server->shutdown();
        });
    });
});

bench_watchdog($server, $o['timeout'],
    ["batch_co_{$o['size']}" => 'tasks/s', "batch_taskco_{$o['size']}" => 'tasks/s'], $reported);
bench_start($server);
