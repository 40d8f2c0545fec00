<?php
// co_roundtrip: N sequential round trips from worker 0 to a task worker that echoes its input.
// Two results, p50 in microseconds (extras p99 and mean):
//   co_roundtrip_taskwait  $server->taskwait($data, 5.0, $dst) outside any coroutine (blocking)
//   co_roundtrip_taskco    $server->taskCo([$data]) inside a coroutine
// taskwait goes to task worker --dst (0 by default, -1: Swoole picks an idle one); taskCo cannot
// name a task worker. Each is preceded by --warmup untimed round trips.
//
//     php perf/swoole/co_roundtrip.php [--n 20000] [--payload 103] [--dst 0]

declare(strict_types=1);
require __DIR__ . '/_common.php';

$o = bench_opts(['n' => 20000, 'payload' => 103, 'dst' => 0, 'warmup' => 2000, 'timeout' => 120]);
$data = bench_task_data($o['payload']);
$reported = new Swoole\Atomic(0);

$server = bench_server();
$server->set(bench_settings());
$server->on('receive', function () {});
$server->on('task', function (Swoole\Server $server, int $taskId, int $srcWorkerId, mixed $data) {
    return $data;
});
$server->on('finish', function () {});

$server->on('workerStart', function (Swoole\Server $server, int $wid) use ($data, $o, $reported) {
    if ($server->taskworker || $wid !== 0) {
        return;
    }
    Swoole\Timer::after(300, function () use ($server, $data, $o, $reported) {
        $n = $o['n'];
        $extras = ['n' => $n, 'payload' => strlen(serialize($data))];

        // Blocking taskwait (this timer callback runs outside any coroutine).
        for ($i = 0; $i < $o['warmup']; $i++) {
            $server->taskwait($data, 5.0, $o['dst']);
        }
        $samples = [];
        $ok = true;
        for ($i = 0; $i < $n; $i++) {
            $t = hrtime(true);
            $r = $server->taskwait($data, 5.0, $o['dst']);
            $samples[] = hrtime(true) - $t;
            $ok = $ok && $r === $data;
        }
        $lat = bench_latency($samples);
        bench_emit('co_roundtrip_taskwait', $lat['p50'], 'us',
            $extras + ['p99' => $lat['p99'], 'mean' => $lat['mean'], 'dst_worker_id' => $o['dst'], 'ok' => $ok]);
        $reported->add(1);

        // taskCo inside a coroutine.
        go(function () use ($server, $data, $o, $reported, $n, $extras) {
            for ($i = 0; $i < $o['warmup']; $i++) {
                $server->taskCo([$data], 5.0);
            }
            $samples = [];
            $ok = true;
            for ($i = 0; $i < $n; $i++) {
                $t = hrtime(true);
                $r = $server->taskCo([$data], 5.0);
                $samples[] = hrtime(true) - $t;
                $ok = $ok && $r[0] === $data;
            }
            $lat = bench_latency($samples);
            bench_emit('co_roundtrip_taskco', $lat['p50'], 'us',
                $extras + ['p99' => $lat['p99'], 'mean' => $lat['mean'], 'ok' => $ok]);
            $reported->add(1);
            $server->shutdown();
        });
    });
});

bench_watchdog($server, $o['timeout'],
    ['co_roundtrip_taskwait' => 'us', 'co_roundtrip_taskco' => 'us'], $reported);
bench_start($server);
