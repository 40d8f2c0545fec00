<?php
// table: Swoole\Table (shared-memory hash table) from plain PHP, no server. 1024 rows (in a
// table created with room for 2048) with an int column and a 32-byte string column; --ops operations each, cycling over the rows:
//   table_set   $table->set($key, ['i' => $i, 's' => $s32])
//   table_get   $table->get($key)
//   table_incr  $table->incr($key, 'i', 1)
// Value: ops/s.
//
//     php perf/swoole/table.php [--ops 1000000] [--rows 1024]

declare(strict_types=1);
require __DIR__ . '/_common.php';

$o = bench_opts(['ops' => 1000000, 'rows' => 1024]);
$rows = $o['rows'];
$ops = $o['ops'];

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

$extras = ['ops' => $ops, 'rows' => $rows, 'table_size' => $size];

// set (the first pass over the keys creates the rows)
$ok = true;
$t = hrtime(true);
for ($i = 0; $i < $ops; $i++) {
    $ok = $table->set($keys[$cycle ? $i & $mask : $i % $rows], ['i' => $i, 's' => $s32]) && $ok;
}
$elapsed = (hrtime(true) - $t) / 1e9;
bench_emit('table_set', round($ops / $elapsed, 1), 'ops/s',
    $extras + ['elapsed_s' => round($elapsed, 4), 'ok' => $ok && $table->count() === $rows]);

// get
$ok = true;
$t = hrtime(true);
for ($i = 0; $i < $ops; $i++) {
    $row = $table->get($keys[$cycle ? $i & $mask : $i % $rows]);
}
$elapsed = (hrtime(true) - $t) / 1e9;
bench_emit('table_get', round($ops / $elapsed, 1), 'ops/s',
    $extras + ['elapsed_s' => round($elapsed, 4), 'ok' => is_array($row) && $row['s'] === $s32]);

// incr
$before = array_sum(array_map(fn($k) => $table->get($k, 'i'), $keys));
$t = hrtime(true);
for ($i = 0; $i < $ops; $i++) {
    $table->incr($keys[$cycle ? $i & $mask : $i % $rows], 'i', 1);
}
$elapsed = (hrtime(true) - $t) / 1e9;
$after = array_sum(array_map(fn($k) => $table->get($k, 'i'), $keys));
bench_emit('table_incr', round($ops / $elapsed, 1), 'ops/s',
    $extras + ['elapsed_s' => round($elapsed, 4), 'ok' => $after - $before === $ops]);
