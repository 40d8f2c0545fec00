<?php
// A separate program that hands tasks to a Swoole server's task workers through the server's
// SysV message queue (task_ipc_mode 3, message_queue_key), building Swoole's task packet by
// hand the way Swoft 1.x's QueueTask did. Needs only PHP's sysvmsg extension, not Swoole.
// Started by queue.php; prints one JSON line.
//
//     php perf/swoole/queue_producer.php --key 0x70001001 --n 200000 [--payload 103]
//         [--mode oneway|reply] [--reply-key 0x70001002] [--warmup 1000]
//
// oneway: sends N tasks as fast as the queue takes them; prints the time of the first send.
// reply:  N sequential round trips; the packet's task id carries this program's pid in its
//         high 32 bits, and the task worker echoes the task data, serialized, on the reply queue
//         under that message type (a large one through a temporary file whose name it sends).
//         Prints p50/p99/mean in microseconds.
//
// Swoole 6.0's packet (struct swoole::DataHead, then the data), 40 bytes of header on x86-64:
//   int64  fd          task id
//   uint64 msg_id
//   uint32 len         length of the data that follows
//   int16  reactor_id  source worker id (unused here: no reply through Swoole)
//   uint8  type        SW_SERVER_EVENT_TASK = 7
//   uint8  flags
//   uint16 server_fd
//   uint16 ext_flags   SW_TASK_TMPFILE 1 | SW_TASK_SERIALIZE 2 | SW_TASK_NONBLOCK 4 | SW_TASK_NOREPLY 128
//   uint32 reserved
//   double time        dispatch time, seconds
// Data of SW_IPC_MAX_SIZE (8192) - 40 bytes or more goes in a temporary file; the packet then
// carries struct PacketTask { size_t length; char tmpfile[256]; }, and the task worker
// deletes the file after reading it.

declare(strict_types=1);

const SW_SERVER_EVENT_TASK = 7;
const SW_TASK_TMPFILE = 1;
const SW_TASK_SERIALIZE = 2;
const SW_TASK_NONBLOCK = 4;
const SW_TASK_NOREPLY = 128;
const SW_IPC_MAX_SIZE = 8192;
const SW_DATAHEAD_SIZE = 40;
const SW_TASK_TMP_PATH_SIZE = 256;

$opts = ['key' => 0x70001001, 'reply-key' => 0x70001002, 'n' => 200000, 'payload' => 103,
         'mode' => 'oneway', 'warmup' => 1000];
for ($i = 1; $i < $argc; $i++) {
    $name = substr($argv[$i], 2);
    if (!str_starts_with($argv[$i], '--') || !array_key_exists($name, $opts) || !isset($argv[$i + 1])) {
        fwrite(STDERR, "usage: see the top of this file\n");
        exit(2);
    }
    $value = $argv[++$i];
    $opts[$name] = is_int($opts[$name]) ? intval($value, 0) : $value;
}

function task_packet(mixed $data, int $taskId): string
{
    $flags = SW_TASK_NONBLOCK | SW_TASK_NOREPLY;
    if (!is_string($data)) {
        $data = serialize($data);
        $flags |= SW_TASK_SERIALIZE;
    }
    if (strlen($data) >= SW_IPC_MAX_SIZE - SW_DATAHEAD_SIZE) {
        $file = tempnam(sys_get_temp_dir(), 'swoole.task');
        file_put_contents($file, $data);
        $data = pack('Q', strlen($data)) . str_pad($file, SW_TASK_TMP_PATH_SIZE, "\0");
        $flags |= SW_TASK_TMPFILE;
    }
    return pack('qQLsCCSSLd', $taskId, 0, strlen($data), 0, SW_SERVER_EVENT_TASK, 0, 0, $flags, 0,
                microtime(true)) . $data;
}

// The task data: [1, <string>, 3.5], the string padded to make the serialized data --payload
// bytes long (as in _common.php).
$len = max(0, $opts['payload'] - 45);   // a few bytes short: see bench_task_data()
while (strlen(serialize([1, str_repeat('x', $len), 3.5])) < $opts['payload']) {
    $len++;
}
$data = [1, str_repeat('x', $len), 3.5];

$queue = msg_get_queue($opts['key']);
$pid = getmypid();

if ($opts['mode'] === 'oneway') {
    $failed = 0;
    $start = hrtime(true);
    for ($i = 0; $i < $opts['n']; $i++) {
        // Packed per message, as a real producer would (serialize() included).
        $packet = task_packet($data, $i);
        if (!msg_send($queue, 1, $packet, false, true, $err)) {
            $failed++;
        }
    }
    echo json_encode(['start_ns' => $start, 'sent_ns' => hrtime(true), 'sent' => $opts['n'] - $failed,
                      'failed' => $failed, 'packet' => strlen($packet)]), "\n";
    exit($failed ? 1 : 0);
}

if ($opts['mode'] === 'reply') {
    $replies = msg_get_queue($opts['reply-key']);
    $samples = [];
    $ok = true;
    $total = $opts['warmup'] + $opts['n'];
    for ($i = 0; $i < $total; $i++) {
        $t = hrtime(true);
        msg_send($queue, 1, task_packet($data, ($pid << 32) | $i), false, true);
        if (!msg_receive($replies, $pid, $type, 1 << 20, $result, false, 0, $err)) {
            fwrite(STDERR, "msg_receive failed: $err\n");
            exit(1);
        }
        $result = unserialize($result);
        if (is_array($result) && isset($result['tmpfile'])) {   // a large reply
            $file = $result['tmpfile'];
            $result = unserialize(file_get_contents($file));
            unlink($file);
        }
        if ($i >= $opts['warmup']) {
            $samples[] = hrtime(true) - $t;
            $ok = $ok && $result === $data;
        }
    }
    sort($samples);
    $n = count($samples);
    echo json_encode(['n' => $n, 'p50' => round($samples[intdiv($n, 2)] / 1e3, 3),
                      'p99' => round($samples[(int)($n * 0.99)] / 1e3, 3),
                      'mean' => round(array_sum($samples) / $n / 1e3, 3), 'ok' => $ok]), "\n";
    exit(0);
}

fwrite(STDERR, "--mode is oneway or reply\n");
exit(2);
