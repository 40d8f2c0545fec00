<?php
// table: Swoole\Table (shared-memory hash table) from plain PHP, no server. 1024 rows (in a
// table created with room for 2048) with an int column and a 32-byte string column; --ops
// operations each, cycling over the rows, timed in --chunks equal parts:
//   table_set   $table->set($key, ['i' => $i, 's' => $s32])
//   table_get   $table->get($key)
//   table_incr  $table->incr($key, 'i', 1)
// Value: ops per second of CPU time (getrusage: user + system) in the fastest part, so that the
// time another process has the CPU counts neither here nor there; wall_ops_s: ops per second
// of wall-clock time in the fastest part; mean_ops_s: wall-clock, over all parts.
// perf/bench_table.py times pyswtask.Table the same way.
//
//     php perf/swoole/table.php [--ops 1000000] [--rows 1024] [--chunks 5]

declare(strict_types=1);
require __DIR__ . '/_common.php';

$o = bench_opts(['ops' => 1000000, 'rows' => 1024, 'chunks' => 5]);
$rows = $o['rows'];
$ops = $o['ops'];
$chunks = max(1, $o['chunks']);
$per = intdiv($ops, $chunks);
$ops = $per * $chunks;

// Swoole\Table($size) cannot hold $size rows once keys collide in its hash: give it room.
$size = 2 * $rows;
$table = new Swoole\Table($size);
$table->column('i', Swoole\Table::TYPE_INT);
$table->column('s', Swoole\Table::TYPE_STRING, 32);
$table->create();

$keys = [];
for ($k = 0; $k < $rows; $k++) {
    $keys[] = "row$k";
}
$s32 = str_repeat('s', 32);
$mask = $rows - 1;
$cycle = ($rows & $mask) === 0;   // a power of two: index with a mask

$extras = ['ops' => $ops, 'rows' => $rows, 'table_size' => $size, 'chunks' => $chunks];

/** This process's CPU time (user + system), in ns. */
function cpu_ns(): float
{
    $r = getrusage();
    return ($r['ru_utime.tv_sec'] + $r['ru_stime.tv_sec']) * 1e9
         + ($r['ru_utime.tv_usec'] + $r['ru_stime.tv_usec']) * 1e3;
}

/** [best ops per CPU second, extras] from the chunks' CPU and wall times in ns. */
function table_rates(array $cpu, array $ns, int $per): array
{
    $total = array_sum($ns) / 1e9;
    return [round($per / (max(min($cpu), 1.0) / 1e9), 1),
            ['wall_ops_s' => round($per / (min($ns) / 1e9), 1),
             'mean_ops_s' => round($per * count($ns) / $total, 1), 'elapsed_s' => round($total, 4)]];
}

// set (the first pass over the keys creates the rows)
$ok = true;
$ns = $cpu = [];
for ($c = 0, $i = 0; $c < $chunks; $c++) {
    $c0 = cpu_ns();
    $t = hrtime(true);
    for ($end = $i + $per; $i < $end; $i++) {
        $ok = $table->set($keys[$cycle ? $i & $mask : $i % $rows], ['i' => $i, 's' => $s32]) && $ok;
    }
    $ns[] = hrtime(true) - $t;
    $cpu[] = cpu_ns() - $c0;
}
[$best, $more] = table_rates($cpu, $ns, $per);
bench_emit('table_set', $best, 'ops/s',
    $extras + $more + ['ok' => $ok && $table->count() === $rows]);

// get
$ns = $cpu = [];
for ($c = 0, $i = 0; $c < $chunks; $c++) {
    $c0 = cpu_ns();
    $t = hrtime(true);
    for ($end = $i + $per; $i < $end; $i++) {
        $row = $table->get($keys[$cycle ? $i & $mask : $i % $rows]);
    }
    $ns[] = hrtime(true) - $t;
    $cpu[] = cpu_ns() - $c0;
}
[$best, $more] = table_rates($cpu, $ns, $per);
bench_emit('table_get', $best, 'ops/s',
    $extras + $more + ['ok' => is_array($row) && $row['s'] === $s32]);

// incr
$before = array_sum(array_map(fn($k) => $table->get($k, 'i'), $keys));
$ns = $cpu = [];
for ($c = 0, $i = 0; $c < $chunks; $c++) {
    $c0 = cpu_ns();
    $t = hrtime(true);
    for ($end = $i + $per; $i < $end; $i++) {
        $table->incr($keys[$cycle ? $i & $mask : $i % $rows], 'i', 1);
    }
    $ns[] = hrtime(true) - $t;
    $cpu[] = cpu_ns() - $c0;
}
[$best, $more] = table_rates($cpu, $ns, $per);
$after = array_sum(array_map(fn($k) => $table->get($k, 'i'), $keys));
bench_emit('table_incr', $best, 'ops/s',
    $extras + $more + ['ok' => $after - $before === $ops]);
