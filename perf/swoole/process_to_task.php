<?php
// process_to_task: a user process (Server::addProcess) sends N messages with
// $server->sendMessage($data, $workerId), alternately to workers 0 and 1; each worker's
// onPipeMessage calls $server->task($data), the task workers echo it back to onFinish.
// Value: tasks/s from the first message sent to the last onFinish, over both workers.
// With --pipe-only the workers just count the messages (no task): the bare pipe, reported as
// workload "process_pipe_message".
//
//     php perf/swoole/process_to_task.php [--n 200000] [--payload 103] [--pipe-only]

declare(strict_types=1);
require __DIR__ . '/_common.php';

$o = bench_opts(['n' => 200000, 'payload' => 103, 'pipe-only' => false, 'timeout' => 120]);
$data = bench_task_data($o['payload']);
$per = intdiv($o['n'], BENCH_WORKERS);
$n = $per * BENCH_WORKERS;
$workload = $o['pipe-only'] ? 'process_pipe_message' : 'process_to_task';

$start = new Swoole\Atomic\Long(0);
$end = new Swoole\Atomic\Long(0);
$finished = new Swoole\Atomic(0);   // workers done
$failed = new Swoole\Atomic(0);     // sendMessage()/task() calls that returned false
$reported = new Swoole\Atomic(0);

$server = bench_server();
$server->set(bench_settings());
$server->on('receive', function () {});
$server->on('task', function (Swoole\Server $server, int $taskId, int $srcWorkerId, mixed $data) {
    return $data;
});

$seen = 0;
$last = null;
$count = function (Swoole\Server $server, mixed $result)
        use (&$seen, &$last, $per, $n, $data, $start, $end, $finished, $failed, $reported, $workload) {
    if (++$seen !== $per) {
        return;
    }
    $now = hrtime(true);
    while (($prev = $end->get()) < $now && !$end->cmpset($prev, $now)) {
    }
    if ($finished->add(1) !== BENCH_WORKERS) {
        return;
    }
    $elapsed = ($end->get() - $start->get()) / 1e9;
    bench_emit($workload, round($n / $elapsed, 3), 'tasks/s', [
        'n' => $n, 'payload' => strlen(serialize($data)), 'elapsed_s' => round($elapsed, 4),
        'ok' => $result === $data && $failed->get() === 0,
    ]);
    $reported->add(1);
    $server->shutdown();
};

$server->on('pipeMessage', function (Swoole\Server $server, int $srcWorkerId, mixed $message)
        use ($o, $count, $failed) {
    if ($o['pipe-only']) {
        $count($server, $message);
    } elseif ($server->task($message) === false) {
        $failed->add(1);
    }
});
$server->on('finish', function (Swoole\Server $server, int $taskId, mixed $result) use ($count) {
    $count($server, $result);
});

$server->addProcess(new Swoole\Process(function () use ($server, $data, $n, $start, $failed) {
    usleep(500_000);   // let the workers come up
    $start->set(hrtime(true));
    for ($i = 0; $i < $n; $i++) {
        if (!$server->sendMessage($data, $i & 1)) {
            $failed->add(1);
        }
    }
    while (true) {
        sleep(60);     // until the server shuts down (a user process that returns is restarted)
    }
}, false, 0, false));

bench_watchdog($server, $o['timeout'], [$workload => 'tasks/s'], $reported);
bench_start($server);
