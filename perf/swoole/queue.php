<?php
// queue: tasks from a separate program through the server's SysV message queue.
// This script starts the Swoole server (itself with --serve: task_ipc_mode 3, message_queue_key
// --key) as one child, waits until its task workers are up, then runs queue_producer.php as a
// second child (a plain PHP program, not a child of the server). Two results:
//   queue_oneway  N tasks sent by the producer (packed by hand, see queue_producer.php), tasks/s
//                 from its first msg_send to the moment the task workers have run all N
//                 (counted in a Swoole\Atomic)
//   queue_reply   --reply-n sequential round trips: the task worker echoes the task data on a
//                 second SysV queue (--key + 1) that the producer reads; p50/p99/mean in us
// The queues are removed at the end.
//
//     php perf/swoole/queue.php [--n 200000] [--reply-n 20000] [--payload 103] [--key 0x70001001]

declare(strict_types=1);
require __DIR__ . '/_common.php';

$o = bench_opts(['n' => 200000, 'reply-n' => 20000, 'warmup' => 1000, 'payload' => 103,
                 'key' => 0x70001001, 'timeout' => 120, 'serve' => false]);
$replyKey = $o['key'] + 1;
const REPLY_INLINE_MAX = 8000;   // below the kernel's default msgmax, 8192

if ($o['serve']) {
    serve($o, $replyKey);
    exit(0);
}

/** The server: its task workers run what the queue brings and count it. */
function serve(array $o, int $replyKey): void
{
    $ran = new Swoole\Atomic(0);
    $up = new Swoole\Atomic(0);
    $done = new Swoole\Atomic(0);
    $oneway = $o['n'];
    $total = $o['n'] + $o['warmup'] + $o['reply-n'];

    $server = bench_server();
    $server->set(bench_settings(['task_ipc_mode' => 3, 'message_queue_key' => $o['key']]));
    $server->on('receive', function () {});
    $server->on('finish', function () {});
    $replies = null;
    $server->on('workerStart', function (Swoole\Server $server, int $wid) use ($up, $replyKey, &$replies) {
        if ($server->taskworker) {
            $replies = msg_get_queue($replyKey);
            if ($up->add(1) === BENCH_TASK_WORKERS) {
                echo json_encode(['ready' => true]), "\n";
            }
        }
    });
    $server->on('task', function (Swoole\Server $server, int $taskId, int $srcWorkerId, mixed $data)
            use ($ran, $done, $oneway, $total, &$replies) {
        $replyTo = $taskId >> 32;   // the producer's pid for tasks that want a reply
        if ($replyTo > 0) {
            // Replies over the queue's per-message limit go in a temporary file, as Swoole's
            // own large task packets do.
            $reply = serialize($data);
            if (strlen($reply) > REPLY_INLINE_MAX) {
                $file = tempnam(sys_get_temp_dir(), 'swoole.reply');
                file_put_contents($file, $reply);
                $reply = serialize(['tmpfile' => $file]);
            }
            msg_send($replies, $replyTo, $reply, false, true);
        }
        $count = $ran->add(1);
        if ($count === $oneway) {
            echo json_encode(['oneway_end_ns' => hrtime(true), 'ran' => $count,
                              'ok' => $replyTo === 0 && is_array($data)]), "\n";
        } elseif ($count === $total) {
            echo json_encode(['done' => true, 'ran' => $count]), "\n";
            $done->set(1);
            $server->shutdown();
        }
        return null;   // the tasks carry SW_TASK_NOREPLY: nothing goes back through Swoole
    });
    // Should the driver go away, the server still stops by itself.
    bench_watchdog($server, $o['timeout'] + 10, ['queue_server' => 'tasks'], $done);
    $server->start();
}

// ---- the driver ----

function remove_queue(int $key): void
{
    if (msg_queue_exists($key)) {
        msg_remove_queue(msg_get_queue($key));
    }
}

/** Reads one JSON line from $pipe before $deadline (hrtime ns); null on timeout or EOF. */
function read_json($pipe, int $deadline): ?array
{
    $line = '';
    while (hrtime(true) < $deadline) {
        $r = [$pipe];
        $w = $e = null;
        $left = max(0, intdiv($deadline - hrtime(true), 1000));
        if (stream_select($r, $w, $e, intdiv($left, 1_000_000), $left % 1_000_000) === 0) {
            continue;
        }
        $chunk = fgets($pipe);
        if ($chunk === false) {
            return null;
        }
        $line .= $chunk;
        if (str_ends_with($line, "\n")) {
            return json_decode($line, true);
        }
    }
    return null;
}

function start(array $cmd)
{
    $proc = proc_open($cmd, [0 => ['file', '/dev/null', 'r'], 1 => ['pipe', 'w'], 2 => STDERR], $pipes);
    if (!is_resource($proc)) {
        fwrite(STDERR, "cannot start " . implode(' ', $cmd) . "\n");
        exit(1);
    }
    return [$proc, $pipes[1]];
}

/** Waits for $proc to exit before $deadline, then terminates it (SIGTERM, then SIGKILL). */
function finish($proc, int $deadline): void
{
    while (proc_get_status($proc)['running'] && hrtime(true) < $deadline) {
        usleep(20_000);
    }
    if (proc_get_status($proc)['running']) {
        proc_terminate($proc, 15);
        $stop = hrtime(true) + 10_000_000_000;
        while (proc_get_status($proc)['running'] && hrtime(true) < $stop) {
            usleep(20_000);
        }
        if (proc_get_status($proc)['running']) {
            proc_terminate($proc, 9);
        }
    }
    proc_close($proc);
}

remove_queue($o['key']);      // messages left from an earlier run would be counted
remove_queue($replyKey);

$deadline = hrtime(true) + $o['timeout'] * 1_000_000_000;
$args = ['--n', (string)$o['n'], '--reply-n', (string)$o['reply-n'], '--warmup', (string)$o['warmup'],
         '--payload', (string)$o['payload'], '--key', (string)$o['key']];
[$server, $serverOut] = start(array_merge([PHP_BINARY, __FILE__, '--serve'], $args));
$status = 0;
$extras = ['payload' => $o['payload'], 'key' => sprintf('0x%x', $o['key'])];

$fail = function (string $workload, string $unit, string $why) use (&$status) {
    bench_emit($workload, null, $unit, ['error' => $why]);
    $status = 1;
};

$ready = read_json($serverOut, $deadline);
if (!($ready['ready'] ?? false)) {
    $fail('queue_oneway', 'tasks/s', 'the server did not start');
    $fail('queue_reply', 'us', 'the server did not start');
} else {
    $producer = [PHP_BINARY, __DIR__ . '/queue_producer.php', '--key', (string)$o['key'],
                 '--reply-key', (string)$replyKey, '--payload', (string)$o['payload']];

    // One-way.
    [$proc, $out] = start(array_merge($producer, ['--mode', 'oneway', '--n', (string)$o['n']]));
    $sent = read_json($out, $deadline);
    finish($proc, $deadline);
    $end = read_json($serverOut, $deadline);
    if (!isset($sent['start_ns'], $end['oneway_end_ns'])) {
        $fail('queue_oneway', 'tasks/s', 'the tasks did not all run in time');
    } else {
        $elapsed = ($end['oneway_end_ns'] - $sent['start_ns']) / 1e9;
        bench_emit('queue_oneway', round($o['n'] / $elapsed, 3), 'tasks/s', ['n' => $o['n']] + $extras + [
            'elapsed_s' => round($elapsed, 4), 'send_s' => round(($sent['sent_ns'] - $sent['start_ns']) / 1e9, 4),
            'packet' => $sent['packet'], 'ok' => $end['ok'] && $sent['failed'] === 0,
        ]);
    }

    // Round trips.
    [$proc, $out] = start(array_merge($producer, ['--mode', 'reply', '--n', (string)$o['reply-n'],
                                                  '--warmup', (string)$o['warmup']]));
    $lat = read_json($out, $deadline);
    finish($proc, $deadline);
    if (!isset($lat['p50'])) {
        $fail('queue_reply', 'us', 'the round trips did not complete in time');
    } else {
        bench_emit('queue_reply', $lat['p50'], 'us', ['n' => $lat['n']] + $extras + [
            'p99' => $lat['p99'], 'mean' => $lat['mean'], 'ok' => $lat['ok'],
        ]);
    }
    read_json($serverOut, min($deadline, hrtime(true) + 5_000_000_000));   // {"done": true}
}

finish($server, min($deadline, hrtime(true) + 15_000_000_000));
remove_queue($o['key']);
remove_queue($replyKey);
exit($status);
