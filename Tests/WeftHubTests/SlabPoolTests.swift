#if canImport(Glibc)
import Glibc
#endif
import Foundation
import XCTest
import WeftTestSupport
@testable import WeftVFS

/// The pool behind large read slabs (SPEC.md §7, Slab memory): freed memory is reused, and the
/// slabs in use plus the pooled ones stay within the budget. Each test has a pool of its own.
final class SlabPoolTests: XCTestCase {
    private let mib = 1 << 20

    func testFreedSlabsAreReusedWithinTheBudget() {
        let pool = SlabPool(budgetBytes: 8 * mib)
        var slabs = (0..<4).map { _ in Slab(capacity: 3 * mib + 5, pool: pool) }
        XCTAssertEqual(pool.usage.live, 16 * mib, "sized in whole MiB")
        let addresses = Set(slabs.map(\.pointer))
        slabs.removeAll()
        XCTAssertEqual(pool.usage.live, 0)
        XCTAssertEqual(pool.usage.pooled, 8 * mib, "only what fits the budget is kept")

        let allocated = pool.allocations
        let exact = Slab(capacity: 4 * mib, pool: pool)
        XCTAssertTrue(addresses.contains(exact.pointer), "an equal size is reused")
        XCTAssertEqual(pool.allocations, allocated)
        let smaller = Slab(capacity: 2 * mib + 1, pool: pool)
        XCTAssertEqual(pool.allocations, allocated + 1, "a larger pooled slab does not serve a smaller one")
        XCTAssertEqual(pool.usage.live, 7 * mib)
        XCTAssertLessThanOrEqual(pool.usage.live + pool.usage.pooled, pool.budgetBytes)
        exact.pointer.storeBytes(of: 0xAB, as: UInt8.self)
        smaller.pointer.advanced(by: 2 * mib).storeBytes(of: 0xCD, as: UInt8.self)
        XCTAssertEqual(smaller.capacity, 2 * mib + 1, "the caller sees the size it asked for")
    }

    func testAMissFreesPooledMemoryBeyondTheBudget() {
        let pool = SlabPool(budgetBytes: 8 * mib)
        var slabs = [Slab(capacity: 4 * mib, pool: pool), Slab(capacity: 4 * mib, pool: pool)]
        slabs.removeAll()
        XCTAssertEqual(pool.usage.pooled, 8 * mib)
        // 1 MiB: no pooled slab has its size, and a new one would pass the budget, so pooled
        // memory is freed first.
        let small = Slab(capacity: mib, pool: pool)
        XCTAssertEqual(pool.usage.live, mib)
        XCTAssertEqual(pool.usage.pooled, 4 * mib)
        XCTAssertLessThanOrEqual(pool.usage.live + pool.usage.pooled, pool.budgetBytes)
        withExtendedLifetime(small) {}
    }

    /// Fresh slab memory is faulted in when it is taken (on the fetching thread), not page by
    /// page where the reply is first copied into it.
    func testFreshSlabMemoryIsResidentWhenTaken() throws {
        let pool = SlabPool(budgetBytes: 8 * mib)
        let slab = Slab(capacity: 4 * mib, pool: pool)
        let pages = 4 * mib / Int(getpagesize())
        var resident = [UInt8](repeating: 0, count: pages)
        XCTAssertEqual(mincore(slab.pointer, 4 * mib, &resident), 0, String(cString: strerror(errno)))
        XCTAssertEqual(resident.filter { $0 & 1 == 0 }.count, 0, "pages not yet resident")
    }

    /// Pooled-size slabs are mappings of their own: from 2 MiB on, 2 MiB-aligned and advised
    /// for huge pages (VM_HUGEPAGE, "hg" in smaps' VmFlags), so that O_DIRECT reads into them
    /// reach the disk in large requests; a 1 MiB one is plain pages.
    func testPooledSlabsAreMappedForHugePages() throws {
        let pool = SlabPool(budgetBytes: 16 * mib)
        var large: Slab? = Slab(capacity: 3 * mib + 5, pool: pool)
        let small = Slab(capacity: mib, pool: pool)
        let pointer = try XCTUnwrap(large).pointer
        XCTAssertEqual(Int(bitPattern: pointer) % (2 * mib), 0, "a 2 MiB boundary")
        XCTAssertEqual(Int(bitPattern: small.pointer) % Int(getpagesize()), 0)
        let flags = try XCTUnwrap(Mappings.flags(of: pointer), "the slab is a mapping of its own")
        let smallFlags = try XCTUnwrap(Mappings.flags(of: small.pointer))
        if Mappings.kernelHasHugePages {
            XCTAssertTrue(flags.contains("hg"), "advised MADV_HUGEPAGE: \(flags)")
        }
        XCTAssertFalse(smallFlags.contains("hg"), "under 2 MiB: not advised: \(smallFlags)")
        // The whole slab is usable, and the memory goes back to the pool and is reused.
        pointer.initializeMemory(as: UInt8.self, repeating: 0x5A, count: 4 * mib)
        XCTAssertEqual(pointer.load(fromByteOffset: 4 * mib - 1, as: UInt8.self), 0x5A)
        large = nil
        XCTAssertNil(large)
        XCTAssertEqual(pool.usage.pooled, 4 * mib)
        XCTAssertEqual(Slab(capacity: 4 * mib, pool: pool).pointer, pointer)
        pool.drain()
        XCTAssertEqual(pool.usage.pooled, 0)
        withExtendedLifetime(small) {}
    }

    /// The write buffers of a `BufferPool` are 2 MiB-aligned, and each 2 MiB range is advised
    /// for huge pages only when a large write (1 MiB, FUSE's largest) is the first to reach it:
    /// a buffer that takes only a small write keeps small pages.
    func testWriteBuffersTakeHugePagesOnlyForLargeWrites() throws {
        let buffers = BufferPool(bufferBytes: 4 * mib, maxBuffers: 1)
        let large = buffers.take()
        let base = UnsafeRawPointer(try XCTUnwrap(large.bytes.baseAddress))
        XCTAssertEqual(Int(bitPattern: base) % (2 * mib), 0)
        func advised(_ address: UnsafeRawPointer) throws -> Bool {
            try XCTUnwrap(Mappings.flags(of: address)).contains("hg")
        }
        XCTAssertFalse(try advised(base), "nothing advised before a write")
        let block = [UInt8](repeating: 0x33, count: mib)
        block.withUnsafeBytes { large.append($0) }
        if Mappings.kernelHasHugePages {
            XCTAssertTrue(try advised(base), "a 1 MiB write at the start advises the first 2 MiB")
        }
        XCTAssertFalse(try advised(base + 2 * mib), "the second 2 MiB not yet")
        block.withUnsafeBytes { large.append($0) }
        XCTAssertFalse(try advised(base + 2 * mib), "a write inside the first range does not reach the second")
        block.withUnsafeBytes { large.append($0) }
        if Mappings.kernelHasHugePages {
            XCTAssertTrue(try advised(base + 2 * mib), "the write that reaches the second range advises it")
        }
        XCTAssertEqual(Array(large.bytes.suffix(4)), [0x33, 0x33, 0x33, 0x33])

        // A small write first: its range stays small pages, even when large writes follow.
        let small = buffers.take()
        let smallBase = UnsafeRawPointer(try XCTUnwrap(small.bytes.baseAddress))
        [UInt8](repeating: 1, count: 64 * 1024).withUnsafeBytes { small.append($0) }
        block.withUnsafeBytes { small.append($0) }
        XCTAssertFalse(try advised(smallBase), "\(Mappings.flags(of: smallBase) ?? [])")
        block.withUnsafeBytes { small.append($0) }
        if Mappings.kernelHasHugePages {
            XCTAssertTrue(try advised(smallBase + 2 * mib), "a large write reaches the second range first")
        }

        buffers.give(large)
        buffers.give(small)
        XCTAssertEqual(buffers.idleCount, 1, "one kept, the other unmapped beyond the bound")
        XCTAssertEqual(UnsafeRawPointer(try XCTUnwrap(buffers.take().bytes.baseAddress)), base)
    }

    func testSmallSlabsAreNotPooled() {
        let pool = SlabPool(budgetBytes: 8 * mib)
        var slab: Slab? = Slab(capacity: 64 * 1024, pool: pool)
        XCTAssertEqual(pool.usage.live, 0)
        slab = nil
        XCTAssertNil(slab)
        XCTAssertEqual(pool.usage.pooled, 0)
    }

    func testCacheBoundRaisesTheBudgetAndDrainEmptiesThePool() {
        let pool = SlabPool(budgetBytes: 8 * mib)
        _ = BlockCache(capacityBytes: 32 * mib, slabs: pool)
        XCTAssertEqual(pool.budgetBytes, 32 * mib + 64 * mib, "the bound and the fetches in flight")
        _ = BlockCache(capacityBytes: 16 * mib, slabs: pool)
        XCTAssertEqual(pool.budgetBytes, 96 * mib, "several caches share the largest bound")
        XCTAssertEqual(SlabPool.inFlightAllowance(cacheBytes: 1024 * mib), 128 * mib)
        var slabs = (0..<3).map { _ in Slab(capacity: 4 * mib, pool: pool) }
        slabs.removeAll()
        XCTAssertEqual(pool.usage.pooled, 12 * mib)
        pool.drain()
        XCTAssertEqual(pool.usage.pooled, 0)
    }

    func testBlockCacheRemoveAllHandsItsSlabsToThePool() throws {
        let pool = SlabPool(budgetBytes: 8 * mib)
        let cache = BlockCache(capacityBytes: 32 * mib, slabs: pool)
        var slab: Slab? = Slab(capacity: 2 * mib, pool: cache.slabs)
        let blockBytes = 64 * 1024
        for index in 0..<32 {
            cache.fill(.init(object: 7, block: UInt32(index)),
                       CachedBlock(slab: try XCTUnwrap(slab), offset: index * blockBytes, length: blockBytes))
        }
        XCTAssertEqual(cache.usedBytes, 2 * mib)
        XCTAssertNotNil(cache.get(.init(object: 7, block: 31)))
        let pointer = try XCTUnwrap(slab).pointer
        XCTAssertEqual(cache.removeAll(), 2 * mib)
        XCTAssertEqual(cache.usedBytes, 0)
        XCTAssertNil(cache.get(.init(object: 7, block: 0)))
        XCTAssertEqual(pool.usage.pooled, 0, "this test still holds the slab")
        slab = nil
        XCTAssertEqual(pool.usage.pooled, 2 * mib, "the last block went: the memory is pooled")
        let reused = Slab(capacity: 2 * mib, pool: pool)
        XCTAssertEqual(reused.pointer, pointer)
    }

    /// A sequential read of more than the cache holds: each fetch takes a slab while the cache
    /// is full, the fill evicts the oldest blocks, and their slab goes back. The slabs must
    /// come from the pool once it has them; with the budget at the cache's bound alone, slabs
    /// in use were always above it, and every fetch allocated (and faulted in) fresh memory.
    func testASequentialReadLargerThanTheCacheReusesItsSlabs() throws {
        let pool = SlabPool(budgetBytes: 0)
        let cache = BlockCache(capacityBytes: 64 * mib, slabs: pool)
        let blockBytes = 64 * 1024
        let blocksPerSlab = 4 * mib / blockBytes
        var inFlight: [Slab] = []
        for object in 0..<200 {
            // Read-ahead keeps a few fetches in flight: their slabs are taken before the cache evicts.
            inFlight.append(Slab(capacity: 4 * mib, pool: cache.slabs))
            guard inFlight.count > 3 else { continue }
            let slab = inFlight.removeFirst()
            cache.fill((0..<blocksPerSlab).map { block in
                (BlockCache.Key(object: UInt64(object), block: UInt32(block)),
                 CachedBlock(slab: slab, offset: block * blockBytes, length: blockBytes))
            })
        }
        XCTAssertLessThanOrEqual(cache.usedBytes, 64 * mib)
        XCTAssertLessThanOrEqual(pool.allocations, 64 / 4 + 8,
                                 "\(pool.allocations) slabs allocated for 200 fetches of 4 MiB through a 64 MiB cache")
        XCTAssertLessThanOrEqual(pool.usage.live + pool.usage.pooled, pool.budgetBytes)
    }
}
