import Foundation
import XCTest
import WeftProto
@testable import WeftVFS

/// The block cache's batch calls (SPEC.md §7, Block cache): one lock per stretch of blocks, with
/// the same single-flight rules as the per-block calls.
final class BlockCacheTests: XCTestCase {
    private let blockBytes = Limits.blockSizeBytes

    private func key(_ block: Int, object: SliceID = 9) -> BlockCache.Key {
        BlockCache.Key(object: object, block: UInt32(block))
    }

    private func block(_ slab: Slab, _ index: Int) -> CachedBlock {
        CachedBlock(slab: slab, offset: index * blockBytes, length: blockBytes)
    }

    private func states(_ found: [BlockCache.Lookup]) -> [String] {
        found.map {
            switch $0 {
            case .cached: "cached"
            case .claimed: "claimed"
            case .busy: "busy"
            }
        }
    }

    func testLookupReturnsCachedBlocksClaimsFreeOnesAndReportsBusyOnes() throws {
        let cache = BlockCache(capacityBytes: 64 * blockBytes, slabs: SlabPool(budgetBytes: 1 << 20))
        let slab = Slab(capacity: 8 * blockBytes, pool: cache.slabs)
        cache.fill([(key(0), block(slab, 0)), (key(1), block(slab, 1))])
        XCTAssertTrue(cache.tryClaim(key(3)), "another reader fetches block 3")

        let found = cache.lookup(object: 9, blocks: 0...4)
        XCTAssertEqual(states(found), ["cached", "cached", "claimed", "busy", "claimed"])
        if case .cached(let first) = found[0] { XCTAssertEqual(first.pointer, slab.pointer) } else { XCTFail() }
        XCTAssertEqual(cache.tryClaim(object: 9, blocks: 0...5), [false, false, false, false, false, true],
                       "cached and claimed blocks cannot be claimed again; block 5 was free")
        XCTAssertEqual(states(cache.lookup(object: 10, blocks: 0...1)), ["claimed", "claimed"],
                       "another object's blocks are separate")

        cache.fill([(key(2), block(slab, 2))])
        cache.abandon([key(3), key(4), key(5)])
        XCTAssertNotNil(cache.get(key(2)))
        XCTAssertNil(cache.get(key(4)), "an abandoned claim leaves nothing cached")
        XCTAssertEqual(cache.tryClaim(object: 9, blocks: 2...5), [false, true, true, true])
        XCTAssertEqual(cache.usedBytes, 8 * blockBytes, "the slab counts whole while any block of it is cached")
    }

    func testTryClaimRunStopsAtTheFirstCachedOrFetchedBlock() {
        let cache = BlockCache(capacityBytes: 64 * blockBytes, slabs: SlabPool(budgetBytes: 1 << 20))
        let slab = Slab(capacity: blockBytes, pool: cache.slabs)
        cache.fill(key(5), block(slab, 0))
        XCTAssertTrue(cache.tryClaim(key(8)))
        XCTAssertEqual(cache.tryClaimRun(object: 9, from: 2, through: 10), 3, "blocks 2-4, up to the cached 5")
        XCTAssertEqual(cache.tryClaimRun(object: 9, from: 5, through: 10), 0)
        XCTAssertEqual(cache.tryClaimRun(object: 9, from: 6, through: 10), 2, "blocks 6-7, up to the claimed 8")
        XCTAssertEqual(cache.tryClaimRun(object: 9, from: 9, through: 10), 2)
        XCTAssertEqual(cache.tryClaimRun(object: 9, from: 11, through: 10), 0, "an empty stretch")
        XCTAssertEqual(states(cache.lookup(object: 9, blocks: 2...4)), ["busy", "busy", "busy"])
    }

    func testOneBatchFillWakesAWaiterAndKeepsTheBound() throws {
        let cache = BlockCache(capacityBytes: 4 * blockBytes, slabs: SlabPool(budgetBytes: 1 << 20))
        XCTAssertEqual(states(cache.lookup(object: 9, blocks: 0...5)), Array(repeating: "claimed", count: 6))
        let waited = expectation(description: "a reader waiting for block 3 gets it")
        Thread.detachNewThread {
            let (cached, claimed) = cache.claim(self.key(3))
            XCTAssertNotNil(cached)
            XCTAssertFalse(claimed)
            waited.fulfill()
        }
        Thread.sleep(forTimeInterval: 0.05)   // let it wait (it also passes if it comes later)
        let slabs = (0..<6).map { _ in Slab(capacity: blockBytes, pool: cache.slabs) }
        cache.fill((0..<6).map { (key($0), block(slabs[$0], 0)) })
        wait(for: [waited], timeout: 10)
        XCTAssertEqual(cache.usedBytes, 4 * blockBytes, "filled past the bound, then the oldest went")
        XCTAssertNil(cache.get(key(0)))
        XCTAssertNil(cache.get(key(1)))
        XCTAssertNotNil(cache.get(key(5)))
        XCTAssertEqual(cache.tryClaim(object: 9, blocks: 0...1), [true, true], "evicted blocks are free again")
    }

    /// The bound is slab memory (SPEC.md §7, Block cache): a slab counts whole while any of its
    /// blocks is cached. A reader that keeps one hot block of each object it reads once (a
    /// file's header) used to keep every object's slab, beyond the bound: a hit on a block of a
    /// mostly evicted slab now moves it into memory of its own.
    func testHotBlocksOfEvictedSlabsDoNotHoldTheirSlabs() throws {
        let pool = SlabPool(budgetBytes: 0)
        let capacity = 16 << 20
        let cache = BlockCache(capacityBytes: capacity, slabs: pool)
        let objectBlocks = 64
        for object in SliceID(1)...200 {
            // A whole-object fetch: 4 MiB, one slab; then the header (block 0) is read again,
            // and the headers of the objects before it stay hot.
            let slab = Slab(capacity: objectBlocks * blockBytes, pool: pool)
            for index in 0..<objectBlocks { slab.pointer.storeBytes(of: UInt8(truncatingIfNeeded: object), toByteOffset: index * blockBytes, as: UInt8.self) }
            cache.fill((0..<objectBlocks).map { (key($0, object: object), block(slab, $0)) })
            for earlier in (object > 40 ? object - 40 : 1)...object {
                let header = try XCTUnwrap(cache.get(key(0, object: earlier)), "header of object \(earlier) while reading \(object)")
                XCTAssertEqual(header.pointer.load(as: UInt8.self), UInt8(truncatingIfNeeded: earlier), "a moved block keeps its bytes")
            }
            XCTAssertLessThanOrEqual(cache.usedBytes, capacity)
            XCTAssertLessThanOrEqual(pool.usage.live, capacity + SlabPool.inFlightAllowance(cacheBytes: capacity),
                                     "slab memory in use stays within the bound and its allowance (object \(object))")
        }
        XCTAssertGreaterThan(cache.statistics.relocations, 100, "the hot headers were moved out of their slabs")
        XCTAssertLessThan(cache.statistics.relocations, 400, "each at most a few times, not at every hit")
        let relocated = try XCTUnwrap(cache.get(key(0, object: 170)))
        XCTAssertEqual(relocated.slab.capacity, blockBytes, "a moved header is a slab of its own")
        XCTAssertNotNil(cache.get(key(63, object: 200)), "the newest object stays whole")
        XCTAssertNil(cache.get(key(63, object: 190)), "cold blocks of older objects went")
        cache.removeAll()
        XCTAssertEqual(cache.usedBytes, 0)
    }

    /// A block of a stranded slab that was read once when the eviction stranded it stays where
    /// it is, and moves at its second hit; the slab's cold rest then goes, with its memory.
    func testABlockOfAStrandedSlabMovesAtItsSecondHit() throws {
        let pool = SlabPool(budgetBytes: 0)
        let cache = BlockCache(capacityBytes: (4 << 20) + blockBytes, slabs: pool)
        let large = Slab(capacity: 64 * blockBytes, pool: pool)
        cache.fill((0..<64).map { (key($0, object: 1), block(large, $0)) })
        cache.fill(key(0, object: 2), block(Slab(capacity: blockBytes, pool: pool), 0))
        XCTAssertNotNil(cache.get(key(0, object: 1)))
        for index in 51..<64 { XCTAssertNotNil(cache.get(key(index, object: 1))) }
        // Oldest first: blocks 1-50 of object 1, object 2's block, then the blocks just read.
        cache.fill(key(0, object: 3), block(Slab(capacity: blockBytes, pool: pool), 0))
        XCTAssertNil(cache.get(key(0, object: 2)), "the single-block slab went: that freed enough")
        XCTAssertNil(cache.get(key(50, object: 1)))
        XCTAssertEqual(cache.statistics.relocations, 0, "no block of the stranded slab was hot when it was stranded")
        XCTAssertEqual(cache.usedBytes, 64 * blockBytes + blockBytes)
        let moved = try XCTUnwrap(cache.get(key(0, object: 1)))
        XCTAssertEqual(cache.statistics.relocations, 1)
        XCTAssertEqual(moved.slab.capacity, blockBytes)
        XCTAssertEqual(moved.pointer.load(as: UInt8.self), large.pointer.load(as: UInt8.self))
        XCTAssertNil(cache.get(key(51, object: 1)), "the slab's cold rest went at once, back within the bound")
        XCTAssertEqual(cache.usedBytes, 2 * blockBytes, "object 3's block and the moved one")
        XCTAssertNotNil(cache.get(key(0, object: 3)))
    }

    /// The eviction that strands a slab moves only blocks read again well after the block it
    /// evicts: a sequential reader's block looked up twice by two neighbouring requests stays,
    /// and goes with its slab.
    func testAnEvictionMovesOnlyBlocksReadAgainLater() throws {
        let pool = SlabPool(budgetBytes: 0)
        let cache = BlockCache(capacityBytes: 8 << 20, slabs: pool)
        let first = Slab(capacity: 64 * blockBytes, pool: pool)
        cache.fill((0..<64).map { (key($0, object: 1), block(first, $0)) })
        for index in 0..<64 {
            XCTAssertNotNil(cache.get(key(index, object: 1)))
            if index == 60 { XCTAssertNotNil(cache.get(key(index, object: 1)), "at the edge of two requests") }
        }
        let second = Slab(capacity: 64 * blockBytes, pool: pool)
        cache.fill((0..<64).map { (key($0, object: 2), block(second, $0)) })
        XCTAssertEqual(cache.usedBytes, 8 << 20, "at the bound, nothing evicted")
        XCTAssertNotNil(cache.get(key(62, object: 1)), "read again after a whole object")
        cache.fill(key(0, object: 3), block(Slab(capacity: blockBytes, pool: pool), 0))
        XCTAssertEqual(cache.statistics.relocations, 1)
        XCTAssertNil(cache.get(key(60, object: 1)), "read twice a moment apart: not hot, gone with its slab")
        let moved = try XCTUnwrap(cache.get(key(62, object: 1)))
        XCTAssertTrue(moved.slab !== first)
        XCTAssertEqual(cache.usedBytes, (4 << 20) + 2 * blockBytes, "object 2, object 3's block and the moved one")
        XCTAssertEqual(cache.statistics.evictions, 63)
    }

    /// A fetch larger than the bound stays cached whole, the only slab: dropping some of its
    /// blocks would free no memory.
    func testAFetchLargerThanTheBoundStaysWhole() {
        let cache = BlockCache(capacityBytes: 4 * blockBytes, slabs: SlabPool(budgetBytes: 1 << 20))
        let small = Slab(capacity: blockBytes, pool: cache.slabs)
        cache.fill(key(0, object: 1), block(small, 0))
        let large = Slab(capacity: 6 * blockBytes, pool: cache.slabs)
        cache.fill((0..<6).map { (key($0), block(large, $0)) })
        XCTAssertNil(cache.get(key(0, object: 1)), "the older slab went")
        XCTAssertEqual((0..<6).filter { cache.get(key($0)) != nil }.count, 6)
        XCTAssertEqual(cache.usedBytes, 6 * blockBytes)
        cache.fill(key(0, object: 2), block(Slab(capacity: blockBytes, pool: cache.slabs), 0))
        XCTAssertEqual(cache.usedBytes, blockBytes, "a new slab: the large one goes whole")
    }
}
