<?php
// http_task: a Swoole\Http\Server (SWOOLE_BASE, 2 workers, 2 task workers) that perf/bench_http.py
// loads with wrk, the Swoole side of its two workloads:
//   GET /       "Hello, world!"
//   GET /task   one taskCo of the --payload-byte task data, echoed by a task worker, then "ok"
// It prints nothing and serves until SIGTERM.
//
//     php perf/swoole/http_task.php --port 8080 [--payload 103]

declare(strict_types=1);
require __DIR__ . '/_common.php';

$o = bench_opts(['port' => 8080, 'payload' => 103]);
$data = bench_task_data($o['payload']);

$server = new Swoole\Http\Server('127.0.0.1', $o['port'], SWOOLE_BASE);
// taskCo needs the request callback to run in a coroutine.
$server->set(bench_settings(['enable_coroutine' => true, 'http_compression' => false]));
$server->on('request', function (Swoole\Http\Request $req, Swoole\Http\Response $resp) use ($server, $data) {
    $resp->header('Content-Type', 'text/plain');
    if ($req->server['request_uri'] === '/task') {
        $result = $server->taskCo([$data], 5.0);
        $resp->end(($result[0] ?? null) === $data ? 'ok' : 'bad');
        return;
    }
    $resp->end('Hello, world!');
});
$server->on('task', function (Swoole\Server $server, int $taskId, int $srcWorkerId, mixed $data) {
    return $data;
});
$server->on('finish', function () {});
$server->start();
