<?php
// table: Swoole\Table (shared-memory hash table) from plain PHP, no server. 1024 rows (in a
// table created with room for 2048) with an int column and a 32-byte string column; --ops
// operations each, cycling over the rows, timed in --chunks equal parts:
//   table_set   $table->set($key, ['i' => $i, 's' => $s32])
//   table_get   $table->get($key)
//   table_incr  $table->incr($key, 'i', 1)
// Value: ops/s of the fastest part (a shared machine's pauses fall in the others); mean_ops_s:
// over all of them. perf/bench_table.py times pyswtask.Table the same way.
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

/** [best ops/s, mean ops/s, seconds] from the chunks' times in ns. */
function table_rates(array $ns, int $per): array
{
    $total = array_sum($ns) / 1e9;
    return [round($per / (min($ns) / 1e9), 1), round($per * count($ns) / $total, 1), round($total, 4)];
}

// set (the first pass over the keys creates the rows)
$ok = true;
$ns = [];
for ($c = 0, $i = 0; $c < $chunks; $c++) {
    $t = hrtime(true);
    for ($end = $i + $per; $i < $end; $i++) {
        $ok = $table->set($keys[$cycle ? $i & $mask : $i % $rows], ['i' => $i, 's' => $s32]) && $ok;
    }
    $ns[] = hrtime(true) - $t;
}
[$best, $mean, $elapsed] = table_rates($ns, $per);
bench_emit('table_set', $best, 'ops/s',
    $extras + ['mean_ops_s' => $mean, 'elapsed_s' => $elapsed, 'ok' => $ok && $table->count() === $rows]);

// get
$ns = [];
for ($c = 0, $i = 0; $c < $chunks; $c++) {
    $t = hrtime(true);
    for ($end = $i + $per; $i < $end; $i++) {
        $row = $table->get($keys[$cycle ? $i & $mask : $i % $rows]);
    }
    $ns[] = hrtime(true) - $t;
}
[$best, $mean, $elapsed] = table_rates($ns, $per);
bench_emit('table_get', $best, 'ops/s',
    $extras + ['mean_ops_s' => $mean, 'elapsed_s' => $elapsed, 'ok' => is_array($row) && $row['s'] === $s32]);

// incr
$before = array_sum(array_map(fn($k) => $table->get($k, 'i'), $keys));
$ns = [];
for ($c = 0, $i = 0; $c < $chunks; $c++) {
    $t = hrtime(true);
    for ($end = $i + $per; $i < $end; $i++) {
        $table->incr($keys[$cycle ? $i & $mask : $i % $rows], 'i', 1);
    }
    $ns[] = hrtime(true) - $t;
}
[$best, $mean, $elapsed] = table_rates($ns, $per);
$after = array_sum(array_map(fn($k) => $table->get($k, 'i'), $keys));
bench_emit('table_incr', $best, 'ops/s',
    $extras + ['mean_ops_s' => $mean, 'elapsed_s' => $elapsed, 'ok' => $after - $before === $ops]);
