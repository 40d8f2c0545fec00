<?php
// async_throughput: $server->task() -> onFinish, 1000 in flight per worker (each finish sends the
// next), N tasks split over the 2 workers; the 2 task workers echo their input.
// Value: tasks/s from the first task sent to the last finish, over both workers.
// Task data of 8152+ bytes goes through a temporary file, in Swoole's task_tmpdir (/tmp unless
// --task-tmpdir names another directory, e.g. /dev/shm, a tmpfs: Swoole's best configuration).
//
//     php perf/swoole/async_throughput.php [--n 200000] [--payload 103] [--inflight 1000]
//                                          [--task-tmpdir DIR]

declare(strict_types=1);
require __DIR__ . '/_common.php';

$o = bench_opts(['n' => 0, 'payload' => 103, 'inflight' => 1000, 'timeout' => 120,
                 'task-tmpdir' => '']);
// Task data of 8152+ bytes goes through a temporary file in Swoole: a smaller default there.
$n = $o['n'] > 0 ? $o['n'] : ($o['payload'] >= 8192 ? 5000 : 200000);
$data = bench_task_data($o['payload']);
$per = intdiv($n, BENCH_WORKERS);
$n = $per * BENCH_WORKERS;

$times = new Swoole\Table(8);
$times->column('start', Swoole\Table::TYPE_INT);
$times->column('end', Swoole\Table::TYPE_INT);
$times->column('ok', Swoole\Table::TYPE_INT);
$times->create();
$finished = new Swoole\Atomic(0);   // workers done
$reported = new Swoole\Atomic(0);   // result lines printed

$server = bench_server();
$server->set(bench_settings($o['task-tmpdir'] !== '' ? ['task_tmpdir' => $o['task-tmpdir']] : []));
$server->on('receive', function () {});
$server->on('task', function (Swoole\Server $server, int $taskId, int $srcWorkerId, mixed $data) {
    return $data;
});

$sent = 0;
$done = 0;
$failed = 0;
$server->on('finish', function (Swoole\Server $server, int $taskId, mixed $result)
        use (&$sent, &$done, &$failed, $per, $data, $times, $finished, $reported, $n, $o) {
    $done++;
    if ($sent < $per) {
        $sent++;
        if ($server->task($data) === false) {
            $failed++;
        }
        return;
    }
    if ($done !== $per) {
        return;
    }
    $wid = $server->worker_id;
    $times->set("w$wid", ['end' => hrtime(true), 'ok' => (int)($result === $data && $failed === 0)]);
    if ($finished->add(1) !== BENCH_WORKERS) {
        return;
    }
    $start = PHP_INT_MAX;
    $end = 0;
    $ok = true;
    foreach ($times as $row) {
        $start = min($start, $row['start']);
        $end = max($end, $row['end']);
        $ok = $ok && $row['ok'] === 1;
    }
    $elapsed = ($end - $start) / 1e9;
    bench_emit('async_throughput', round($n / $elapsed, 3), 'tasks/s', [
        'n' => $n, 'payload' => strlen(serialize($data)), 'inflight' => $o['inflight'],
        'elapsed_s' => round($elapsed, 4), 'ok' => $ok,
        'task_tmpdir' => $o['task-tmpdir'] !== '' ? $o['task-tmpdir'] : '/tmp',  // Swoole's default
    ]);
    $reported->add(1);
    $server->shutdown();
});

$server->on('workerStart', function (Swoole\Server $server, int $wid) use (&$sent, $per, $data, $times, $o) {
    if ($server->taskworker) {
        return;
    }
    // Let every process of the server come up first.
    Swoole\Timer::after(300, function () use (&$sent, $server, $wid, $per, $data, $times, $o) {
        $times->set("w$wid", ['start' => hrtime(true), 'end' => 0, 'ok' => 0]);
        $first = min($o['inflight'], $per);
        for ($i = 0; $i < $first; $i++) {
            $sent++;
            $server->task($data);
        }
    });
});

bench_watchdog($server, $o['timeout'], ['async_throughput' => 'tasks/s'], $reported);
bench_start($server);
